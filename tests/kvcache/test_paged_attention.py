"""Paged attention over the fp16 cache vs dense fp32 torch attention on the same fp16-rounded K/V."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from lpipes import _C

ISAS = ["scalar", "avx2", "avx512"]


def _isa_param(isa: str):
    try:
        _C.paged_attention_isa(isa)
    except _C.NativeError as e:
        return pytest.param(isa, marks=pytest.mark.skip(reason=f"{isa} unsupported here: {e}"))
    return isa


ISA_PARAMS = [_isa_param(i) for i in ISAS]
SIMD_PARAMS = [_isa_param(i) for i in ISAS[1:]]


@pytest.fixture(scope="module", autouse=True)
def _warm_pool():
    # Start the native thread pool well before its first parallel region (see the report on the
    # pool's start-up: a region issued while workers are still starting can be missed).
    _C.num_threads()
    time.sleep(0.02)


def _scattered_cache(layers, block_size=16, num_blocks=64, seed=0) -> _C.PagedKVCache:
    """A float16 cache whose free stack is shuffled, so new sessions get non-contiguous blocks."""
    per_block = sum(h * block_size * (d + dv) * 2 for h, d, dv in layers)
    c = _C.PagedKVCache(layers, block_size, per_block * num_blocks, "float16")
    rng = random.Random(seed)
    junk = list(range(1000, 1000 + num_blocks))
    for s in junk:
        c.reserve(s, block_size)
    rng.shuffle(junk)
    for s in junk:
        c.free(s)
    assert c.blocks_used == 0
    return c


class Session:
    """A session in the cache plus its fp16-rounded K/V in fp32, for the dense reference."""

    def __init__(self, cache: _C.PagedKVCache, sid: int, layer: int = 0):
        self.c, self.sid, self.layer = cache, sid, layer
        h, d, dv = cache.layer_shape(layer)
        self.k = torch.empty(0, h, d)
        self.v = torch.empty(0, h, dv)

    def append(self, n: int, *, commit: bool) -> int:
        """Reserve and write n random tokens; returns their first position."""
        pos = self.c.length(self.sid)
        h, d, dv = self.c.layer_shape(self.layer)
        k, v = torch.randn(n, h, d), torch.randn(n, h, dv)
        self.c.reserve(self.sid, n)
        self.c.write(self.layer, self.sid, pos, k, v)
        self.k = torch.cat([self.k, k.half().float()])
        self.v = torch.cat([self.v, v.half().float()])
        if commit:
            self.c.commit(self.sid, pos + n)
        return pos


def dense_attention(q, k, v, q_start, scale, window=0, softcap=0.0):
    """q [T, H, D]; k [L, Hkv, D], v [L, Hkv, Dv] with L >= q_start + T; fp64 math, fp32 result."""
    T, H, _ = q.shape
    g = H // k.shape[1]
    kk = k.double().repeat_interleave(g, 1).transpose(0, 1)  # [H, L, D]
    vv = v.double().repeat_interleave(g, 1).transpose(0, 1)
    s = torch.einsum("thd,hld->htl", q.double(), kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(T).view(T, 1) + q_start
    kpos = torch.arange(k.shape[0]).view(1, -1)
    allowed = kpos <= qpos
    if window > 0:
        allowed &= kpos > qpos - window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("htl,hld->thd", torch.softmax(s, -1), vv).float()


def run(cache, layer, sessions, starts, qs, scale, window=0, softcap=0.0, isa="auto"):
    q = torch.cat(qs)
    cu = [0]
    for x in qs:
        cu.append(cu[-1] + x.shape[0])
    h = q.shape[1]
    out = torch.full((q.shape[0], h, cache.layer_shape(layer)[2]), float("nan"))
    _C.paged_attention(cache, layer, sessions, starts, q, cu, out, scale, window, softcap, isa)
    return [out[a:b] for a, b in zip(cu, cu[1:])]


SHAPES = [(4, 2, 64), (8, 1, 80), (6, 6, 128)]  # (heads, kv heads, head_dim)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("prefix", [0, 37])
@pytest.mark.parametrize("T", [1, 3, 17, 111])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}kv{}d{}".format(*s))
def test_matches_dense(shape, T, prefix, isa):
    torch.manual_seed(T * 100 + prefix)
    H, Hkv, D = shape
    cache = _scattered_cache([(Hkv, D, D)], num_blocks=16, seed=T)
    s = Session(cache, 42)
    if prefix:
        s.append(prefix, commit=True)  # a cached prefix, then this chunk (chunked prefill / decode)
    start = s.append(T, commit=False)
    q = torch.randn(T, H, D)
    scale = 1 / math.sqrt(D)
    (out,) = run(cache, 0, [42], [start], [q], scale, isa=isa)
    want = dense_attention(q, s.k, s.v, start, scale)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    if prefix and T > 1:
        assert cache.block_table(42) != sorted(cache.block_table(42)), "blocks should be scattered"


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("window", [1, 5, 40])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_window_and_softcap(window, softcap, isa):
    torch.manual_seed(window)
    H, Hkv, D = 8, 2, 64
    cache = _scattered_cache([(Hkv, D, D)], block_size=8, num_blocks=32)
    s = Session(cache, 1)
    s.append(70, commit=True)
    for T in (1, 23):
        start = s.append(T, commit=False)
        q = torch.randn(T, H, D) * 3  # large scores, so the softcap matters
        (out,) = run(cache, 0, [1], [start], [q], 0.125, window, softcap, isa)
        want = dense_attention(q, s.k, s.v, start, 0.125, window, softcap)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
        cache.commit(1, start + T)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_several_sessions_one_call(isa):
    torch.manual_seed(3)
    H, Hkv, D = 4, 2, 80
    layers = [(1, 16, 16), (Hkv, D, D)]
    cache = _scattered_cache(layers, block_size=32, num_blocks=40)
    spec = [(7, 50, 1), (8, 0, 30), (9, 300, 5), (10, 1, 1), (11, 33, 0)]  # (session, prefix, new tokens)
    sessions, starts, qs, wants = [], [], [], []
    for sid, prefix, t in spec:
        s = Session(cache, sid, layer=1)
        if prefix:
            s.append(prefix, commit=True)
        start = s.append(t, commit=False) if t else cache.length(sid)
        if not cache.has(sid):
            cache.reserve(sid, 0)
        q = torch.randn(t, H, D)
        sessions.append(sid)
        starts.append(start)
        qs.append(q)
        wants.append(dense_attention(q, s.k, s.v, start, 0.1, window=64, softcap=20.0) if t else q)
    outs = run(cache, 1, sessions, starts, qs, 0.1, 64, 20.0, isa)
    for (sid, _, t), out, want in zip(spec, outs, wants):
        assert out.shape == (t, H, D), sid
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("isa", SIMD_PARAMS)
@pytest.mark.parametrize("shape", [(16, 8, 128), (8, 1, 80), (4, 4, 72), (2, 1, 20)], ids=str)
def test_simd_matches_scalar(shape, isa):
    """Long contexts (the split-key path for few KV heads) and head dims that are not multiples of 16."""
    torch.manual_seed(1)
    H, Hkv, D = shape
    cache = _scattered_cache([(Hkv, D, D)], num_blocks=120)
    s = Session(cache, 5)
    s.append(1500, commit=True)
    for T in (1, 9):
        start = s.append(T, commit=False)
        q = torch.randn(T, H, D)
        (ref,) = run(cache, 0, [5], [start], [q], 1 / math.sqrt(D), isa="scalar")
        (out,) = run(cache, 0, [5], [start], [q], 1 / math.sqrt(D), isa=isa)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        want = dense_attention(q, s.k, s.v, start, 1 / math.sqrt(D))
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
        cache.commit(5, start + T)


def test_extreme_scores_stay_finite():
    """Online softmax must not overflow: huge scores, all-equal keys, one dominant key."""
    H, Hkv, D = 2, 1, 16
    cache = _scattered_cache([(Hkv, D, D)], block_size=8, num_blocks=8)
    k = torch.full((40, 1, D), 1.0)
    k[33] = 60.0
    v = torch.randn(40, 1, D)
    cache.reserve(1, 40)
    cache.write(0, 1, 0, k, v)
    q = torch.full((1, H, D), 60.0)
    for isa in ("scalar", "auto"):
        (out,) = run(cache, 0, [1], [39], [q], 1.0, isa=isa)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, v[33].half().float().expand(1, H, D), atol=1e-6, rtol=0)


def test_bad_arguments():
    E = _C.NativeError
    cache = _scattered_cache([(2, 8, 8)], num_blocks=4)
    cache.reserve(1, 10)
    q, out = torch.randn(3, 4, 8), torch.empty(3, 4, 8)

    def call(**kw):
        args = dict(
            cache=cache, layer=0, session_ids=[1], q_starts=[0], q=q, cu_seqlens=[0, 3], out=out, scale=0.3
        )
        args.update(kw)
        _C.paged_attention(**args)

    call()
    with pytest.raises(E, match="float16"):
        f32 = _C.PagedKVCache([(2, 8, 8)], 8, 1 << 16, "float32")
        f32.reserve(1, 3)
        call(cache=f32)
    with pytest.raises(E, match=r"layer must be in \[0, 1\), got 1"):
        call(layer=1)
    with pytest.raises(E, match="unknown session 2"):
        call(session_ids=[2])
    with pytest.raises(E, match="q_starts must have one entry per session"):
        call(q_starts=[0, 0])
    with pytest.raises(E, match=r"cu_seqlens must have len\(session_ids\) \+ 1 = 2 entries"):
        call(cu_seqlens=[0])
    with pytest.raises(E, match=r"cu_seqlens: must end at q.shape\[0\] = 3, got 2"):
        call(cu_seqlens=[0, 2])
    with pytest.raises(E, match="cu_seqlens: must start at 0"):
        call(cu_seqlens=[1, 3])
    with pytest.raises(E, match=r"q_starts\[0\] \+ q_len = 14 \+ 3 exceeds the capacity of session 1 \(16"):
        call(q_starts=[14])
    with pytest.raises(E, match=r"q_starts\[0\]: must be >= 0"):
        call(q_starts=[-1])
    with pytest.raises(E, match="q: dimension 2 must be the layer's head_dim 8"):
        call(q=torch.randn(3, 4, 6))
    with pytest.raises(E, match="positive multiple of the layer's num_kv_heads 2"):
        call(q=torch.randn(3, 3, 8), out=torch.empty(3, 3, 8))
    with pytest.raises(E, match=r"out: expected shape \[3, 4, 8\], got \[3, 4, 7\]"):
        call(out=torch.empty(3, 4, 7))
    with pytest.raises(E, match="q: expected dtype float32, got float16"):
        call(q=q.half())
    with pytest.raises(E, match="out: expected a contiguous tensor"):
        call(out=torch.empty(4, 3, 8).transpose(0, 1))
    with pytest.raises(E, match="out: must not overlap q"):
        call(out=q)
    with pytest.raises(E, match="window: must be in"):
        call(window=-1)
    with pytest.raises(E, match="softcap: must be >= 0"):
        call(softcap=-1.0)
    with pytest.raises(E, match="scale must be finite"):
        call(scale=float("inf"))
    with pytest.raises(E, match="isa: expected 'auto', 'scalar', 'avx2' or 'avx512', got 'sse'"):
        call(isa="sse")
    assert _C.paged_attention_isa("scalar") == "scalar"
    assert _C.paged_attention_isa() in {"scalar", "avx2", "avx512"}

"""Paged KV cache bookkeeping, storage round trips and argument checks (native class and Python wrapper)."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch

from lpipes import _C
from lpipes.errors import LpipesError, SessionError
from lpipes.runtime.kv import DenseKVCache
from lpipes.runtime.paged import KVCacheFullError, PagedKVCache, layer_shapes_of

LAYERS = [(2, 8, 8), (1, 16, 16)]


def _native(num_blocks: int, block_size: int = 8, dtype: str = "float32", layers=LAYERS) -> _C.PagedKVCache:
    elem = 2 if dtype != "float32" else 4
    per_block = sum(h * block_size * (d + dv) * elem for h, d, dv in layers)
    cache = _C.PagedKVCache(layers, block_size, per_block * num_blocks + per_block // 2, dtype)
    assert cache.num_blocks == num_blocks and cache.block_bytes == per_block
    return cache


def _check_invariants(c: _C.PagedKVCache, model: dict[int, int]) -> None:
    """model: session -> committed length. Tables are disjoint and cover blocks_used exactly."""
    assert c.sessions() == sorted(model)
    seen: set[int] = set()
    for s, length in model.items():
        table = c.block_table(s)
        assert c.length(s) == length
        assert c.capacity(s) == len(table) * c.block_size >= length
        assert not seen & set(table)
        seen |= set(table)
        assert all(0 <= b < c.num_blocks for b in table)
    assert c.blocks_used == len(seen)
    assert c.blocks_used + c.blocks_free == c.num_blocks


@pytest.mark.parametrize("seed", range(4))
def test_random_block_accounting(seed):
    rng = random.Random(seed)
    c = _native(num_blocks=24, block_size=rng.choice([8, 16, 32]))
    bs = c.block_size
    model: dict[int, int] = {}
    fulls = 0
    for _ in range(400):
        op = rng.random()
        s = rng.randrange(8)
        if op < 0.45:
            n = rng.randrange(0, 3 * bs)
            before = (c.blocks_used, c.capacity(s), c.has(s), c.block_table(s) if c.has(s) else None)
            try:
                c.reserve(s, n)
            except _C.KVCacheFullError as e:
                fulls += 1
                assert "KV cache full" in str(e) and f"block_size {bs}" in str(e)
                after = (c.blocks_used, c.capacity(s), c.has(s), c.block_table(s) if c.has(s) else None)
                assert after == before  # all-or-nothing
            else:
                model.setdefault(s, 0)
                assert c.capacity(s) >= model[s] + n
        elif op < 0.7 and s in model:
            model[s] = rng.randint(model[s], c.capacity(s))
            c.commit(s, model[s])
        elif op < 0.85 and s in model:
            c.rollback(s)
            if model[s] == 0:
                del model[s]
            else:
                assert c.capacity(s) == -(-model[s] // bs) * bs  # spare blocks went back
        elif s in model:
            c.free(s)
            del model[s]
        _check_invariants(c, model)
    assert fulls > 0, "the test should exercise a full cache"
    assert c.cache_full_count == fulls
    assert 0 < c.peak_blocks_used <= c.num_blocks
    for s in list(model):
        if rng.random() < 0.5:
            c.rollback(s)
        if c.has(s):
            c.free(s)
    assert c.blocks_used == 0 and c.blocks_free == c.num_blocks and c.sessions() == []


def test_wrapper_random_steps_return_blocks():
    rng = random.Random(7)
    cache = PagedKVCache(
        [(2, 8, 8), None, (1, 16, 16)], 40 * 8 * (2 * 16 + 32) * 4, "float32", 8, first_layer=3
    )
    assert cache.blocks_total == 40
    dense = DenseKVCache()
    live: list[str] = []
    for step in range(60):
        sids = rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 3))
        q = [rng.randint(1, 20) for _ in sids]
        qp = max(q)
        kvs = {
            layer: (torch.randn(len(sids), h, qp, d), torch.randn(len(sids), h, qp, dv))
            for layer, (h, d, dv) in ((3, (2, 8, 8)), (5, (1, 16, 16)))
        }
        try:
            for layer, (k, v) in kvs.items():
                cache.append(sids, layer, k, v, q)
                dense.append(sids, layer, k, v, q)
            kv_len = max(cache.length(s) + n for s, n in zip(sids, q))
            for layer in kvs:
                got, want = cache.gather(sids, layer, kv_len), dense.gather(sids, layer, kv_len)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        except KVCacheFullError:
            cache.rollback(sids)
            dense.rollback(sids)
        else:
            if rng.random() < 0.2:  # a failed forward pass
                cache.rollback(sids)
                dense.rollback(sids)
            else:
                cache.commit(sids, q)
                dense.commit(sids, q)
        for s in set(dense.sessions) | set(cache.sessions):
            assert cache.length(s) == dense.length(s)
        assert sorted(cache.sessions) == sorted(dense.sessions)
        live = cache.sessions
        for s in live:
            if rng.random() < 0.15:
                cache.end(s)
                dense.end(s)
        expected = sum(cache.session_blocks(s) for s in cache.sessions)
        assert cache.blocks_used == expected, step
    for s in cache.sessions:
        cache.end(s)
    assert cache.blocks_used == 0 and cache.blocks_free == cache.blocks_total and cache.sessions == []
    with pytest.raises(SessionError, match="unknown session 'a'"):
        cache.end("a")
    assert cache.length("nobody") == 0


def test_cache_full_is_clear_and_changes_nothing():
    c = _native(num_blocks=4, block_size=8)
    c.reserve(1, 20)  # 3 blocks
    k = torch.randn(20, 2, 8)
    c.write(0, 1, 0, k, k.clone())
    c.commit(1, 20)
    table = c.block_table(1)
    snapshot = np.array(c.k_storage(0), copy=True)
    with pytest.raises(
        _C.KVCacheFullError, match=r"KV cache full: session 2 needs 2 more blocks, 1 of 4 free"
    ):
        c.reserve(2, 9)
    with pytest.raises(RuntimeError, match="session 1 needs 2 more blocks"):
        c.reserve(1, 13)  # 33 tokens: 5 blocks
    assert not c.has(2) and c.block_table(1) == table and c.length(1) == 20 and c.blocks_used == 3
    assert c.capacity(1) == 24
    assert np.array_equal(np.asarray(c.k_storage(0)), snapshot)
    c.reserve(1, 12)  # 32 tokens still fit: the live session keeps growing
    assert c.blocks_used == 4 and c.block_table(1)[:3] == table


def test_wrapper_full_error_keeps_sessions():
    shapes = [(1, 4, 4)]
    per_block = 8 * 8 * 4
    cache = PagedKVCache(shapes, 3 * per_block, torch.float32, block_size=8)
    k = torch.randn(1, 1, 10, 4)
    cache.append(["a"], 0, k, k, [10])
    cache.commit(["a"], [10])
    used = cache.blocks_used
    big = torch.randn(2, 1, 9, 4)
    with pytest.raises(KVCacheFullError, match="KV cache full") as info:
        cache.append(["a", "b"], 0, big, big, [1, 9])
    assert isinstance(info.value, LpipesError) and isinstance(info.value, RuntimeError)
    assert cache.blocks_used == used and cache.sessions == ["a"] and cache.length("a") == 10
    with pytest.raises(KVCacheFullError):  # the public all-or-nothing reservation of a native executor
        cache.reserve(["new", "a"], [1, 30])
    assert cache.blocks_used == used and cache.sessions == ["a"] and cache.capacity("a") == 16
    cache.rollback(["a", "b"])  # what the executor does after a failed forward pass
    cache.append(["a"], 0, big[:1, :, :1], big[:1, :, :1], [1])
    cache.commit(["a"], [1])
    key, _ = cache.gather(["a"], 0, 11)
    assert torch.equal(key[0, :, :10], k[0]) and cache.length("a") == 11


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_float32_round_trip_exact(block_size):
    c = _native(num_blocks=12, block_size=block_size)
    c.reserve(5, 1)  # scatter the blocks of session 7
    c.reserve(7, 3 * block_size + 5)
    k0, v0 = torch.randn(3 * block_size + 5, 2, 8), torch.randn(3 * block_size + 5, 2, 8)
    c.write(0, 7, 0, k0[:11], v0[:11])  # two writes, as a chunked prefill
    c.write(0, 7, 11, k0[11:], v0[11:])
    table = torch.tensor(c.block_table(7))
    for store, src in ((c.k_storage(0), k0), (c.v_storage(0), v0)):
        t = torch.from_numpy(store)
        assert t.shape == (12, 2, block_size, 8) and t.dtype == torch.float32
        got = t[table].permute(1, 0, 2, 3).reshape(2, -1, 8)[:, : src.shape[0]]
        assert torch.equal(got, src.transpose(0, 1))


def _special_values() -> torch.Tensor:
    f16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = f16[torch.isfinite(f16)]
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties between neighbouring halves, in fp32
    rnd = torch.randn(5000) * torch.logspace(-10, 6, 5000)
    extra = torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, float("inf"), float("-inf"), 2**-25]
    )
    return torch.cat([finite, mids, rnd, extra, torch.nextafter(mids, torch.full_like(mids, 1e9))])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rounding_matches_torch(dtype):
    vals = _special_values()
    vals = vals[: vals.numel() // 64 * 64]
    torch_dtype = getattr(torch, dtype)
    per = 16  # tokens per write, one kv head, head_dim 64 -> 1024 values per write
    layers = [(1, 64, 64)]
    n_tok = vals.numel() // 64
    c = _native(num_blocks=-(-n_tok // 16), block_size=16, dtype=dtype, layers=layers)
    c.reserve(1, n_tok)
    k = vals.view(n_tok, 1, 64)
    for t0 in range(0, n_tok, per):
        c.write(0, 1, t0, k[t0 : t0 + per], k[t0 : t0 + per])
    store = torch.from_numpy(c.k_storage(0))
    if dtype == "bfloat16":
        assert store.dtype == torch.uint16
        store = store.view(torch.bfloat16)
    got = store[torch.tensor(c.block_table(1))].reshape(-1)[: vals.numel()]
    want = vals.to(torch_dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    nan = torch.full((1, 1, 64), float("nan"))
    c.free(1)
    c.reserve(2, 1)
    c.write(0, 2, 0, nan, nan)
    store = torch.from_numpy(c.k_storage(0))
    if dtype == "bfloat16":
        store = store.view(torch.bfloat16)
    assert torch.isnan(store[c.block_table(2)[0], 0, 0].float()).all()


def test_wrapper_views_and_dtypes():
    cache = PagedKVCache.from_budget([(2, 8, 8), None, (1, 16, 16)], 1 << 16, "bfloat16", first_layer=10)
    k_store = cache.k_cache(10)
    assert k_store.dtype == torch.bfloat16 and k_store.shape == (cache.blocks_total, 2, 16, 8)
    assert cache.v_cache(12).shape == (cache.blocks_total, 1, 16, 16)
    with pytest.raises(ValueError, match="layer 11 has no KV storage"):
        cache.k_cache(11)
    with pytest.raises(ValueError, match="outside this cache's span"):
        cache.k_cache(13)
    k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    cache.append(["s"], 10, k, k, [5])
    key, value = cache.gather(["s"], 10, 7)
    assert key.dtype == torch.bfloat16 and key.shape == (1, 2, 7, 8)
    assert torch.equal(key[0, :, :5], k[0]) and not key[0, :, 5:].any()
    assert cache.session_blocks("s") == 1
    with pytest.raises(SessionError):
        cache.session_blocks("t")
    assert "1 sessions" in repr(cache)


def test_storage_view_keeps_cache_alive():
    c = _native(num_blocks=2)
    c.reserve(1, 3)
    c.write(0, 1, 0, torch.ones(3, 2, 8), torch.ones(3, 2, 8))
    arr = c.k_storage(0)
    t = torch.from_numpy(c.v_storage(0))
    del c
    gc.collect()
    assert arr.sum() == 3 * 2 * 8 and float(t.sum()) == 3 * 2 * 8


def test_layer_shapes_of_modules():
    class Attn(torch.nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.head_dim = 16
            if not shared:
                self.k_proj = torch.nn.Linear(8, 32)

    class Layer(torch.nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.self_attn = Attn(shared)

    assert layer_shapes_of([Layer(False), Layer(True)]) == [(2, 16, 16), None]


def test_bad_arguments():
    E = _C.NativeError
    with pytest.raises(E, match="block_size must be 8, 16 or 32, got 12"):
        _C.PagedKVCache(LAYERS, 12, 1 << 20, "float32")
    with pytest.raises(E, match="layers must not be empty"):
        _C.PagedKVCache([], 8, 1 << 20, "float32")
    with pytest.raises(E, match=r"budget_bytes \(100\) is smaller than one block"):
        _C.PagedKVCache(LAYERS, 8, 100, "float32")
    with pytest.raises(E, match='dtype must be "float16", "float32" or "bfloat16", got "int8"'):
        _C.PagedKVCache(LAYERS, 8, 1 << 20, "int8")
    with pytest.raises(E, match="must be >= 1"):
        _C.PagedKVCache([(0, 8, 8)], 8, 1 << 20, "float32")
    with pytest.raises(E, match="overflows int64"):
        _C.PagedKVCache([(2**31 - 1, 2**31 - 1, 2**31 - 1)] * 2, 32, 1 << 20, "float32")
    with pytest.raises(E, match="does not fit in int32"):
        _C.PagedKVCache([(2**40, 8, 8)], 8, 1 << 20, "float32")
    with pytest.raises(ValueError, match="dtype must be"):
        PagedKVCache([(1, 8, 8)], 1 << 20, torch.int8)
    with pytest.raises(ValueError, match="no layer with storage"):
        PagedKVCache([None], 1 << 20, "float32")

    c = _native(num_blocks=4)
    c.reserve(1, 10)
    k = torch.randn(3, 2, 8)
    with pytest.raises(
        E, match=r"positions \[14, 17\) of session 1 must lie within \[length, capacity\) = \[0, 16\)"
    ):
        c.write(0, 1, 14, k, k)
    c.write(0, 1, 0, k, k)
    c.commit(1, 3)
    with pytest.raises(E, match="committed tokens are immutable"):
        c.write(0, 1, 2, k, k)
    with pytest.raises(E, match="unknown session 9"):
        c.write(0, 9, 0, k, k)
    with pytest.raises(E, match=r"layer must be in \[0, 2\), got 2"):
        c.write(2, 1, 3, k, k)
    with pytest.raises(E, match=r"k: expected shape \[T, 2, 8\], got \[3, 2, 7\]"):
        c.write(0, 1, 3, torch.randn(3, 2, 7), k)
    with pytest.raises(E, match=r"v: expected shape \[3, 2, 8\], got \[2, 2, 8\]"):
        c.write(0, 1, 3, k, k[:2])
    with pytest.raises(E, match="k: expected dtype float32, got float16"):
        c.write(0, 1, 3, k.half(), k)
    with pytest.raises(E, match="v: expected a contiguous tensor"):
        c.write(0, 1, 3, k, torch.randn(3, 8, 2).transpose(1, 2))
    with pytest.raises(E, match="k: expected a tensor"):
        c.write(0, 1, 3, [1, 2], k)
    with pytest.raises(
        E, match=r"new_length of session 1 must be in \[length, capacity\] = \[3, 16\], got 17"
    ):
        c.commit(1, 17)
    with pytest.raises(E, match="got 2"):
        c.commit(1, 2)
    with pytest.raises(E, match="n must be >= 0"):
        c.reserve(1, -1)
    with pytest.raises(E, match="too large"):
        c.reserve(1, 2**63 - 5)
    with pytest.raises(E, match="unknown session 4"):
        c.free(4)
    with pytest.raises(E, match="unknown session 4"):
        c.block_table(4)
    with pytest.raises(E, match=r"layer must be in \[0, 2\), got -1"):
        c.k_storage(-1)
    c.rollback(4)  # unknown: nothing to drop
    assert c.length(4) == 0 and c.capacity(4) == 0 and not c.has(4)

"""rms_norm, rope and act_mul against fp32 torch references written as transformers computes them."""

from __future__ import annotations

import pytest
import torch

from lpipes import _C, kernels


def ref_rms_norm(x, w, eps, offset=0.0):
    """HF RMSNorm in fp32: x * rsqrt(mean(x^2) + eps), then * (w + offset)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * (w + offset)


def ref_rope(x, cos, sin):
    """HF apply_rotary_pos_emb (rotate_half) on the first rot dims of x[T, heads, head_dim]."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((xr * c + rotated * s, xp), dim=-1)


def ref_act_mul(gate_up, act):
    g, u = gate_up.chunk(2, dim=-1)
    if act == "silu":
        return torch.nn.functional.silu(g) * u
    return torch.nn.functional.gelu(g, approximate="tanh") * u


# rms_norm: the sum of squares is accumulated in a different order (SIMD lanes vs torch's reduction)
# and 1/sqrt is rounded twice in both; a few fp32 ulps relative.
NORM_RTOL, NORM_ATOL = 1e-5, 1e-6
# rope: two products and a sum per element, FMA-contracted or not: a few ulps of |x| ~ 1.
ROPE_RTOL, ROPE_ATOL = 1e-5, 1e-6
# act_mul: the SIMD variants use their own exp (polynomial, ~2 ulp) and write tanh-GELU as
# g * sigmoid(2 s), which is exact in real arithmetic but rounds differently from 0.5 g (1 + tanh(s))
# (torch's form loses all relative precision for g < -5, where the result is below 1e-6 anyway).
ACT_RTOL, ACT_ATOL = 1e-5, 1e-6
# torch's tanh-GELU itself loses precision where tanh(s) ~ -1: 1 + tanh(s) carries an absolute error of
# ~1 ulp of 1.0, so its result is only good to ~2^-24 |g * up| in absolute terms.
GELU_CANCEL = 2.0**-22


def assert_act_close(got, gate_up, act):
    want = ref_act_mul(gate_up, act)
    g, u = gate_up.chunk(2, dim=-1)
    extra = GELU_CANCEL * (g * u).abs() if act == "gelu_tanh" else torch.zeros_like(want)
    extra = torch.nan_to_num(extra, nan=0.0, posinf=0.0)
    tol = ACT_RTOL * want.abs().nan_to_num(posinf=0.0) + ACT_ATOL + extra
    same_special = (got == want) | (got.isnan() & want.isnan())
    bad = ~(same_special | ((got - want).abs() <= tol))
    assert not bad.any(), (
        f"{act}: {int(bad.sum())} elements off, e.g. g={g[bad][:4]} got={got[bad][:4]} want={want[bad][:4]}"
    )


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- rms_norm -----------------------------------------------------------------------------------

NORM_SHAPES = [(1, 1), (1, 1024), (3, 3), (3, 17), (17, 128), (111, 1000), (5, 1031), (2, 4099)]


@pytest.mark.parametrize("M,N", NORM_SHAPES, ids=[f"M{m}-N{n}" for m, n in NORM_SHAPES])
@pytest.mark.parametrize("weight,offset", [("w", 0.0), ("w", 1.0), (None, 0.0)], ids=["w", "1+w", "no-w"])
def test_rms_norm(isa, M, N, weight, offset):
    x = randn(M, N, seed=1, scale=3.0)
    w = randn(N, seed=2) if weight else None
    out = torch.empty(M, N)
    _C.rms_norm(x, w, 1e-6, offset, out, isa)
    torch.testing.assert_close(out, ref_rms_norm(x, w, 1e-6, offset), rtol=NORM_RTOL, atol=NORM_ATOL)


def test_rms_norm_in_place_and_per_head(isa):
    x = randn(4, 8, 64, seed=3)  # q/k norm: per head over head_dim
    w = randn(64, seed=4)
    want = ref_rms_norm(x, w, 1e-5)
    got = kernels.rms_norm(x, w, 1e-5, out=x, isa=isa)
    assert got is x
    torch.testing.assert_close(x, want, rtol=NORM_RTOL, atol=NORM_ATOL)


def test_rms_norm_large_eps_and_zeros(isa):
    x = torch.zeros(3, 40)
    out = kernels.rms_norm(x, torch.ones(40), 1e-6, isa=isa)
    assert torch.equal(out, x)
    x = randn(3, 40, seed=5, scale=1e-3)
    torch.testing.assert_close(
        kernels.rms_norm(x, None, 1.0, isa=isa), ref_rms_norm(x, None, 1.0), rtol=NORM_RTOL, atol=NORM_ATOL
    )


# ---- rope ---------------------------------------------------------------------------------------


def rope_tables(T, rot, base=10000.0, seed=0, attention_scaling=1.0):
    """cos/sin [T, rot] as transformers' default rotary embedding builds them (positions shuffled)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    pos = torch.randperm(4 * T + 3, generator=torch.Generator().manual_seed(seed))[:T].float()
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


ROPE_SHAPES = [
    (1, 1, 2, 2),
    (1, 16, 128, 128),
    (3, 2, 64, 64),
    (17, 5, 34, 34),
    (7, 3, 128, 64),
    (5, 4, 80, 34),
]


@pytest.mark.parametrize(
    "T,heads,head_dim,rot", ROPE_SHAPES, ids=[f"T{t}-H{h}-D{d}-R{r}" for t, h, d, r in ROPE_SHAPES]
)
def test_rope(isa, T, heads, head_dim, rot):
    x = randn(T, heads, head_dim, seed=6)
    cos, sin = rope_tables(T, rot, seed=T, attention_scaling=1.25)
    want = ref_rope(x, cos, sin)
    _C.rope(x, cos, sin, isa)
    torch.testing.assert_close(x, want, rtol=ROPE_RTOL, atol=ROPE_ATOL)


def test_rope_wrapper_accepts_batched_tables(isa):
    x = randn(6, 2, 32, seed=7)
    cos, sin = rope_tables(6, 32)
    want = ref_rope(x, cos, sin)
    assert kernels.rope_(x, cos[None], sin[None], isa=isa) is x
    torch.testing.assert_close(x, want, rtol=ROPE_RTOL, atol=ROPE_ATOL)


# ---- act_mul ------------------------------------------------------------------------------------

ACT_SHAPES = [(1, 1), (1, 3072), (3, 3), (3, 17), (17, 100), (111, 1000), (2, 9000)]


@pytest.mark.parametrize("M,I", ACT_SHAPES, ids=[f"M{m}-I{i}" for m, i in ACT_SHAPES])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_mul(isa, M, I, act):  # noqa: E741
    gate_up = randn(M, 2 * I, seed=8, scale=4.0)
    out = torch.empty(M, I)
    _C.act_mul(gate_up, out, act, isa)
    assert_act_close(out, gate_up, act)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_mul_extremes(isa, act):
    g = torch.tensor(
        [
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            1e-3,
            -1e-3,
            0.5,
            -0.5,
            3.0,
            -3.0,
            10.0,
            -10.0,
            20.0,
            -20.0,
            88.0,
            -88.0,
            90.0,
            -90.0,
            1e4,
            -1e4,
            3e38,
            -3e38,
            float("inf"),
            -float("inf"),
        ]
    )
    gate_up = torch.cat([g, torch.full_like(g, 1.5)])[None]
    got = kernels.act_mul(gate_up, act, isa=isa)
    assert_act_close(got, gate_up, act)  # silu(-inf) = -inf * 0 is NaN in torch too
    nan = kernels.act_mul(torch.tensor([[float("nan"), 1.0]]), act, isa=isa)
    assert nan.isnan().all()


def test_act_mul_wrapper_shapes():
    gu = randn(2, 3, 20, seed=9)
    out = kernels.act_mul(gu, "silu")
    assert out.shape == (2, 3, 10)
    assert_act_close(out, gu, "silu")


def test_simd_matches_scalar_twin(simd_isa):
    gu = randn(9, 2 * 333, seed=10, scale=3.0)
    for act in ("silu", "gelu_tanh"):
        a, b = kernels.act_mul(gu, act, isa=simd_isa), kernels.act_mul(gu, act, isa="scalar")
        g, u = gu.chunk(2, dim=-1)
        tol = 2 * (ACT_RTOL * b.abs() + ACT_ATOL + (GELU_CANCEL * (g * u).abs() if act == "gelu_tanh" else 0))
        assert ((a - b).abs() <= tol).all()
    x, w = randn(9, 333, seed=11), randn(333, seed=12)
    torch.testing.assert_close(
        kernels.rms_norm(x, w, 1e-6, isa=simd_isa),
        kernels.rms_norm(x, w, 1e-6, isa="scalar"),
        rtol=2 * NORM_RTOL,
        atol=2 * NORM_ATOL,
    )
    q = randn(5, 3, 64, seed=13)
    cos, sin = rope_tables(5, 64)
    a = kernels.rope_(q.clone(), cos, sin, isa=simd_isa)
    b = kernels.rope_(q.clone(), cos, sin, isa="scalar")
    torch.testing.assert_close(a, b, rtol=2 * ROPE_RTOL, atol=2 * ROPE_ATOL)


# ---- argument checks ----------------------------------------------------------------------------


def test_rms_norm_bad_arguments():
    x, w, out = torch.randn(3, 8), torch.randn(8), torch.empty(3, 8)
    with pytest.raises(_C.NativeError, match=r"x: expected dtype float32, got float16"):
        _C.rms_norm(x.half(), w, 1e-6, 0.0, out, "auto")
    with pytest.raises(_C.NativeError, match=r"w: dimension 0 must be 8"):
        _C.rms_norm(x, torch.randn(7), 1e-6, 0.0, out, "auto")
    with pytest.raises(_C.NativeError, match=r"w: expected dtype float32, got bfloat16"):
        _C.rms_norm(x, w.bfloat16(), 1e-6, 0.0, out, "auto")
    with pytest.raises(_C.NativeError, match=r"out: dimension 1 must be 8"):
        _C.rms_norm(x, w, 1e-6, 0.0, torch.empty(3, 9), "auto")
    with pytest.raises(_C.NativeError, match=r"x: expected a contiguous tensor"):
        _C.rms_norm(torch.randn(8, 3).T, None, 1e-6, 0.0, out, "auto")
    buf = torch.randn(32)
    with pytest.raises(_C.NativeError, match=r"out: must be x itself or not overlap it"):
        _C.rms_norm(buf[:24].view(3, 8), w, 1e-6, 0.0, buf[1:25].view(3, 8), "auto")
    with pytest.raises(_C.NativeError, match=r"eps: must be >= 0"):
        _C.rms_norm(x, w, -1.0, 0.0, out, "auto")
    with pytest.raises(_C.NativeError, match=r"x: expected a contiguous tensor"):
        kernels.rms_norm(torch.randn(2, 8, 3).transpose(1, 2), w, 1e-6)


def test_rope_bad_arguments():
    x = torch.randn(4, 2, 16)
    cos, sin = rope_tables(4, 16)
    with pytest.raises(_C.NativeError, match=r"x: expected 3 dimensions"):
        _C.rope(x.view(4, 32), cos, sin, "auto")
    with pytest.raises(_C.NativeError, match=r"cos: dimension 0 must be 4"):
        _C.rope(x, cos[:3], sin[:3], "auto")
    with pytest.raises(_C.NativeError, match=r"sin: dimension 1 must be 16"):
        _C.rope(x, cos, sin[:, :8].contiguous(), "auto")
    with pytest.raises(
        _C.NativeError, match=r"rotary dimension \(18\) must be even and at most head_dim \(16\)"
    ):
        _C.rope(x, torch.randn(4, 18), torch.randn(4, 18), "auto")
    with pytest.raises(_C.NativeError, match=r"must be even"):
        _C.rope(x, torch.randn(4, 7), torch.randn(4, 7), "auto")
    with pytest.raises(_C.NativeError, match=r"x: expected a contiguous tensor"):
        _C.rope(torch.randn(2, 4, 16).transpose(0, 1), cos, sin, "auto")
    with pytest.raises(_C.NativeError, match=r"cos: expected dtype float32, got float16"):
        _C.rope(x, cos.half(), sin, "auto")


def test_act_mul_bad_arguments():
    gu, out = torch.randn(3, 8), torch.empty(3, 4)
    with pytest.raises(_C.NativeError, match=r"act: expected 'silu' or 'gelu_tanh', got 'relu'"):
        _C.act_mul(gu, out, "relu", "auto")
    with pytest.raises(_C.NativeError, match=r"gate_up: last dimension must be even"):
        _C.act_mul(torch.randn(3, 7), out, "silu", "auto")
    with pytest.raises(_C.NativeError, match=r"out: dimension 1 must be 4"):
        _C.act_mul(gu, torch.empty(3, 8), "silu", "auto")
    with pytest.raises(_C.NativeError, match=r"out: must not overlap gate_up"):
        _C.act_mul(gu, gu.view(-1)[4:16].view(3, 4), "silu", "auto")
    with pytest.raises(_C.NativeError, match=r"gate_up: expected a contiguous tensor"):
        _C.act_mul(torch.randn(8, 3).T, out, "silu", "auto")
    with pytest.raises(_C.NativeError, match=r"isa: expected 'auto'"):
        _C.act_mul(gu, out, "silu", "neon")

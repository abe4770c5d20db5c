"""linear_f16 (fp16 weights, fp32 activations and accumulation) against an fp32 torch reference.

Covers every kernel path: the streaming GEMV (M = 1) and the tiled kernel for more rows (tiles of up
to 4 x rows over blocks of W rows, W rows 3 at a time on AVX-512, the next block prefetched; several
blocks whenever N * K > 96 Ki), with awkward sizes (K not a multiple of
16/32, N not a multiple of any tile), bias, accumulate, the thread split over N and over M, batch
invariance (a row's output is bit-identical whatever the other rows are), and argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from lpipes import _C, kernels


def ref_linear(x, w, bias=None, out0=None):
    """fp32 torch reference: x @ w.float().T (+ bias) (+ out0)."""
    y = x @ w.float().T
    if bias is not None:
        y = y + bias
    if out0 is not None:
        y = y + out0
    return y


# Both the kernel and the reference accumulate in fp32, in different orders (sequential, blocked,
# SIMD lanes, MKL): each can be off by about sqrt(K) unit roundoffs of sum(|x_k w_k|) (random-walk
# growth of the rounding error). Allow 8x that per element, plus an absolute floor for K ~ 1.
FP32_EPS = 2.0**-24
ROUNDING_FACTOR = 8.0
ABS_FLOOR = 1e-6


def assert_close_linear(got, x, w, bias=None, out0=None):
    want = ref_linear(x, w, bias, out0)
    K = x.shape[-1]
    scale = x.abs() @ w.float().abs().T
    if bias is not None:
        scale = scale + bias.abs()
    if out0 is not None:
        scale = scale + out0.abs()
    tol = ROUNDING_FACTOR * FP32_EPS * math.sqrt(max(K, 1)) * scale + ABS_FLOOR
    err = (got - want).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {got.numel()} elements off; worst error {err.max().item():.3g}, "
        f"tolerance there {tol.flatten()[err.flatten().argmax()].item():.3g}"
    )


def make(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = (torch.randn(N, K, generator=g) / math.sqrt(max(K, 1))).half()
    bias = torch.randn(N, generator=g)
    out0 = torch.randn(M, N, generator=g)
    return x, w, bias, out0


# (M, K, N). M: streaming GEMV 1..4, tiles of 4 rows above (with remainder tiles). K: 1, 3, 17, 111
# and 1000+ (not multiples of 16/32). N: not multiples of any tile; 1029 rows of K = 1037 cross the
# L2 block of W rows; small N with many rows makes the threads split M instead of N.
SHAPES = [
    (1, 1, 1),
    (1, 3, 17),
    (1, 17, 3),
    (1, 111, 1000),
    (1, 1037, 111),
    (1, 2053, 1029),
    (3, 17, 111),
    (3, 1000, 17),
    (4, 1, 3),
    (5, 111, 17),
    (8, 1003, 37),
    (16, 17, 1000),
    (17, 111, 1000),
    (23, 1003, 37),
    (29, 1003, 37),
    (31, 111, 1000),
    (111, 1, 17),
    (111, 3, 111),
    (111, 300, 17),
    (111, 1037, 1029),
    (64, 33, 1),
]
BIAS_ACC = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize("use_bias,accumulate", BIAS_ACC, ids=["plain", "bias", "acc", "bias-acc"])
def test_linear_matches_torch(isa, M, K, N, use_bias, accumulate):
    x, w, bias, out0 = make(M, K, N)
    out = out0.clone()
    _C.linear_f16(x, w, out, bias if use_bias else None, accumulate, isa)
    assert_close_linear(out, x, w, bias if use_bias else None, out0 if accumulate else None)


@pytest.mark.parametrize("M,K,N", [(1, 1037, 1029), (7, 300, 111), (20, 300, 111), (111, 1037, 1029)])
def test_simd_matches_scalar_twin(simd_isa, M, K, N):
    x, w, bias, _ = make(M, K, N, seed=3)
    want = torch.empty(M, N)
    got = torch.empty(M, N)
    _C.linear_f16(x, w, want, bias, False, "scalar")
    _C.linear_f16(x, w, got, bias, False, simd_isa)
    assert_close_linear(got, x, w, bias)
    # Twice the tolerance of either against torch bounds them against each other.
    tol = (
        2 * ROUNDING_FACTOR * FP32_EPS * math.sqrt(K) * (x.abs() @ w.float().abs().T + bias.abs()) + ABS_FLOOR
    )
    assert ((got - want).abs() <= tol).all()


@pytest.mark.parametrize("M", [1, 9, 40])
def test_deterministic(isa, M):
    x, w, bias, _ = make(M, 777, 555, seed=5)
    a = kernels.linear(x, w, bias, isa=isa)
    b = kernels.linear(x, w, bias, isa=isa)
    assert torch.equal(a, b)


@pytest.mark.parametrize("M,K,N", [(1, 2053, 1029), (3, 100, 5000), (40, 300, 17), (111, 1037, 1029)])
def test_thread_count_does_not_matter(isa, M, K, N):
    x, w, bias, _ = make(M, K, N, seed=11)
    before = _C.num_threads()
    try:
        _C.set_num_threads(1)
        one = kernels.linear(x, w, bias, isa=isa)
        _C.set_num_threads(3)
        three = kernels.linear(x, w, bias, isa=isa)
    finally:
        _C.set_num_threads(before)
    assert_close_linear(one, x, w, bias)
    assert_close_linear(three, x, w, bias)
    assert torch.equal(one, three)  # every output is summed the same way whatever thread computes it


def test_every_chunk_is_computed_once_however_threads_share_them(isa):
    """Several x rows: each thread computes its own range of W-row chunks and then takes chunks from the
    others' ends. With more threads than cores (7 on a small machine) threads stall and chunks change
    hands; accumulating into y shows a chunk computed twice or skipped."""
    x, w, bias, out0 = make(16, 256, 6925, seed=17)  # 9 whole chunks of W rows and a partial one
    before = _C.num_threads()
    try:
        _C.set_num_threads(1)
        want = {}
        for M in (2, 5, 16):
            want[M] = out0[:M].clone()
            _C.linear_f16(x[:M], w, want[M], bias, True, isa)
        for threads in (2, 7):
            _C.set_num_threads(threads)
            for _ in range(5):
                for M in (2, 5, 16):
                    got = out0[:M].clone()
                    _C.linear_f16(x[:M], w, got, bias, True, isa)
                    assert torch.equal(got, want[M]), (threads, M)
    finally:
        _C.set_num_threads(before)


@pytest.mark.parametrize("K,N", [(1037, 131), (64, 40), (3072, 7)])
def test_batch_invariant(isa, K, N):
    """Each row's output is bit-identical alone (M = 1) and in batches of every size and offset, with
    1 or 3 threads: a sequence's tokens do not depend on what it is batched with."""
    x, w, bias, _ = make(41, K, N, seed=13)
    alone = torch.cat([kernels.linear(x[i : i + 1], w, bias, isa=isa) for i in range(41)])
    before = _C.num_threads()
    try:
        for threads in (1, 3):
            _C.set_num_threads(threads)
            for start, M in [(0, 2), (1, 3), (0, 4), (2, 5), (3, 8), (0, 13), (5, 24), (0, 41)]:
                got = kernels.linear(x[start : start + M], w, bias, isa=isa)
                assert torch.equal(got, alone[start : start + M]), (threads, start, M)
    finally:
        _C.set_num_threads(before)


def test_exact_on_small_integers(isa):
    # Small integers are exact in fp16 and their products and sums exact in fp32: any variant must
    # then agree bit for bit with the reference.
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (19, 45), generator=g).float()
    w = torch.randint(-3, 4, (70, 45), generator=g).half()
    assert torch.equal(kernels.linear(x, w, isa=isa), x @ w.float().T)


def test_zero_sized(isa):
    x = torch.randn(3, 0)
    w = torch.empty(5, 0, dtype=torch.float16)
    bias = torch.randn(5)
    assert torch.equal(kernels.linear(x, w, bias, isa=isa), bias.expand(3, 5))
    out = torch.ones(3, 5)
    kernels.linear(x, w, out=out, accumulate=True, isa=isa)
    assert torch.equal(out, torch.ones(3, 5))
    assert kernels.linear(torch.randn(0, 4), torch.randn(6, 4).half(), isa=isa).shape == (0, 6)


def test_wrapper_leading_dims_and_out():
    x, w, bias, _ = make(6, 40, 24, seed=9)
    x3 = x.view(2, 3, 40)
    y = kernels.linear(x3, w, bias)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    assert_close_linear(y.view(6, 24), x, w, bias)
    out = torch.zeros(2, 3, 24)
    assert kernels.linear(x3, w, bias, out=out) is out
    assert_close_linear(out.view(6, 24), x, w, bias)
    y1 = kernels.linear(x[0], w)
    assert y1.shape == (24,)
    assert_close_linear(y1.view(1, 24), x[:1], w)
    # A non-contiguous x is made contiguous by the wrapper (not by the kernel).
    xt = torch.randn(40, 6).T
    assert_close_linear(kernels.linear(xt, w), xt, w)
    with pytest.raises(ValueError, match="accumulate"):
        kernels.linear(x, w, accumulate=True)


# ---- argument checks ----------------------------------------------------------------------------


def _args(M=3, K=8, N=5):
    return torch.randn(M, K), torch.randn(N, K).half(), torch.empty(M, N)


@pytest.mark.parametrize(
    "case,match",
    [
        ("x_dtype", r"x: expected dtype float32, got float16"),
        ("w_dtype", r"w: expected dtype float16, got float32"),
        ("out_dtype", r"out: expected dtype float32, got bfloat16"),
        ("bias_dtype", r"bias: expected dtype float32, got float16"),
        ("x_ndim", r"x: expected 2 dimensions"),
        ("w_k", r"w: dimension 1 must be 8"),
        ("out_shape", r"out: dimension 1 must be 5"),
        ("out_rows", r"out: dimension 0 must be 3"),
        ("bias_shape", r"bias: dimension 0 must be 5"),
        ("x_noncontig", r"x: expected a contiguous tensor"),
        ("w_noncontig", r"w: expected a contiguous tensor"),
        ("out_noncontig", r"out: expected a contiguous tensor"),
        ("out_aliases_x", r"out: must not overlap x"),
        ("not_tensor", r"w: expected a tensor"),
        ("bad_isa", r"isa: expected 'auto', 'scalar', 'avx2' or 'avx512', got 'sse9'"),
    ],
)
def test_bad_arguments(case, match):
    x, w, out = _args()
    bias, isa = None, "auto"
    if case == "x_dtype":
        x = x.half()
    elif case == "w_dtype":
        w = w.float()
    elif case == "out_dtype":
        out = out.bfloat16()
    elif case == "bias_dtype":
        bias = torch.zeros(5, dtype=torch.float16)
    elif case == "x_ndim":
        x = x.view(3, 2, 4)
    elif case == "w_k":
        w = torch.randn(5, 7).half()
    elif case == "out_shape":
        out = torch.empty(3, 6)
    elif case == "out_rows":
        out = torch.empty(4, 5)
    elif case == "bias_shape":
        bias = torch.zeros(4)
    elif case == "x_noncontig":
        x = torch.randn(8, 3).T
    elif case == "w_noncontig":
        w = torch.randn(5, 16).half()[:, ::2]
    elif case == "out_noncontig":
        out = torch.empty(5, 3).T
    elif case == "out_aliases_x":
        x = torch.randn(3, 8)
        w = torch.randn(8, 8).half()
        out = x
    elif case == "not_tensor":
        w = [[1.0] * 8] * 5
    elif case == "bad_isa":
        isa = "sse9"
    with pytest.raises(_C.NativeError, match=match):
        _C.linear_f16(x, w, out, bias, False, isa)


def test_native_error_is_value_error():
    assert issubclass(_C.NativeError, ValueError)


def test_resolve_isa(isa):
    assert kernels.resolve_isa(isa) == isa
    assert kernels.resolve_isa("auto") in {"scalar", "avx2", "avx512"}


def test_unavailable_isa_raises(unavailable_isa):
    x, w, out = _args()
    with pytest.raises(_C.NativeError, match=f"isa '{unavailable_isa}' was requested"):
        _C.linear_f16(x, w, out, None, False, unavailable_isa)
    with pytest.raises(_C.NativeError, match="lacks"):
        kernels.resolve_isa(unavailable_isa)

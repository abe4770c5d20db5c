"""fp16 <-> fp32 conversion and read_memory against torch / a plain Python checksum.

Conversions are exact operations (fp16 -> fp32 is exact, fp32 -> fp16 rounds to nearest even), so
every variant must match torch bit for bit, specials included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpipes import _C, kernels


def ref_f16_to_f32(src):
    """fp32 torch reference."""
    return src.float()


def ref_f32_to_f16(src):
    """torch reference (round to nearest even, overflow to inf)."""
    return src.half()


def special_f32():
    """fp32 values that exercise every rounding and range case of fp16."""
    vals = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e10,
        -1e10,
        6.1035156e-05,
        6.0975552e-05,
        5.9604645e-08,
        2.9802322e-08,
        2.9802326e-08,
        1e-9,
        -1e-9,
        1.0009765625,
        1.00048828125,
        1.00146484375,
        2049.0,
        2051.0,
        float("inf"),
        -float("inf"),
        3.4e38,
        1.2e-38,
    ]
    bits = torch.arange(0, 1 << 16, 7, dtype=torch.int32) << 13 | 0x1000  # midpoints between fp16 values
    mids = bits.view(torch.float32)
    mids = mids[mids.isfinite()]
    g = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            torch.tensor(vals),
            mids,
            torch.randn(5000, generator=g) * 1000,
            torch.randn(5000, generator=g) * 1e-5,
        ]
    )


SIZES = [0, 1, 7, 15, 16, 17, 63, 64, 65, 1000, 70001]


@pytest.mark.parametrize("n", SIZES)
def test_f16_to_f32_all_bit_patterns(isa, n):
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    src = every.repeat(2)[:n]
    dst = torch.empty(n)
    _C.f16_to_f32(src, dst, isa)
    want = ref_f16_to_f32(src)
    assert torch.equal(dst.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(dst[ok].view(torch.int32), want[ok].view(torch.int32))


def test_f16_to_f32_every_value(isa):
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got = kernels.f16_to_f32(every, isa=isa)
    want = ref_f16_to_f32(every)
    ok = ~want.isnan()
    assert got[~ok].isnan().all()
    assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32))


@pytest.mark.parametrize("n", SIZES)
def test_f32_to_f16(isa, n):
    src = special_f32().repeat(4)[:n].contiguous()
    got = torch.empty(n, dtype=torch.float16)
    _C.f32_to_f16(src, got, isa)
    want = ref_f32_to_f16(src)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_f32_to_f16_specials(isa):
    src = special_f32()
    got = kernels.f32_to_f16(src, isa=isa)
    assert torch.equal(got.view(torch.int16), ref_f32_to_f16(src).view(torch.int16))
    nan = kernels.f32_to_f16(torch.tensor([float("nan"), -float("nan")]), isa=isa)
    assert nan.isnan().all()


def test_round_trip_shapes(isa):
    x = torch.randn(3, 5, 7).half()
    y = kernels.f16_to_f32(x, isa=isa)
    assert y.shape == (3, 5, 7) and y.dtype == torch.float32
    z = kernels.f32_to_f16(y, isa=isa)
    assert torch.equal(z.view(torch.int16), x.view(torch.int16))
    out = torch.empty(105)  # same number of elements, other shape: allowed
    kernels.f16_to_f32(x, out=out, isa=isa)
    assert torch.equal(out, y.flatten())


def test_convert_bad_arguments():
    with pytest.raises(_C.NativeError, match=r"src: expected dtype float16, got float32"):
        _C.f16_to_f32(torch.randn(4), torch.empty(4), "auto")
    with pytest.raises(_C.NativeError, match=r"dst: expected dtype float32, got float16"):
        _C.f16_to_f32(torch.randn(4).half(), torch.empty(4).half(), "auto")
    with pytest.raises(_C.NativeError, match=r"dst: expected 4 elements"):
        _C.f16_to_f32(torch.randn(4).half(), torch.empty(5), "auto")
    with pytest.raises(_C.NativeError, match=r"src: expected a contiguous tensor"):
        _C.f32_to_f16(torch.randn(4, 4).T, torch.empty(16).half(), "auto")
    with pytest.raises(_C.NativeError, match=r"dst: expected a contiguous tensor"):
        _C.f32_to_f16(torch.randn(8), torch.empty(4, 4).half()[:, ::2], "auto")
    with pytest.raises(_C.NativeError, match=r"isa: expected"):
        _C.f32_to_f16(torch.randn(8), torch.empty(8).half(), "fast")


# ---- read_memory --------------------------------------------------------------------------------


def ref_checksum(buf: torch.Tensor) -> float:
    """Wrapping sum of the buffer's little-endian 64-bit words, then of its trailing bytes."""
    b = buf.contiguous().view(torch.uint8).numpy().tobytes()
    n8 = len(b) // 8 * 8
    words = np.frombuffer(b[:n8], dtype="<u8")
    s = int(words.sum(dtype=np.uint64)) if n8 else 0
    s += sum(b[n8:])
    return float(s % (1 << 64))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 63, 64, 65, 255, 256, 1000, (1 << 20) + 13, (3 << 20) + 4096])
def test_read_memory_checksum(isa, n):
    g = torch.Generator().manual_seed(n)
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    assert kernels.read_memory(buf, isa=isa) == ref_checksum(buf)


def test_read_memory_any_dtype(isa):
    buf = torch.randn(3, 1001)
    assert _C.read_memory(buf, isa) == ref_checksum(buf)
    assert isinstance(_C.read_memory(buf.half(), isa), float)


def test_read_memory_bad_arguments():
    with pytest.raises(_C.NativeError, match=r"buf: expected a contiguous tensor"):
        _C.read_memory(torch.randn(4, 4).T, "auto")
    with pytest.raises(_C.NativeError, match=r"buf: expected a tensor"):
        _C.read_memory(b"bytes", "auto")

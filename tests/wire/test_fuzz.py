"""Hostile input for the frame decoder: a seeded mutation fuzzer over valid frames, allocation bounds for
headers that claim huge sizes, and (slow) a hypothesis-driven run of the same mutations.

The contract under test (``lpipes.wire.decode``): every input either decodes to a :class:`Frame` that
re-encodes to a frame that decodes to the same thing, or raises :class:`WireError`. Any other exception,
a crash, or an allocation sized by what the header claims is a bug. ``tests/wire/test_frames.py`` holds
the hand-written malformed cases and small hypothesis runs; this file throws volume at the decoder.
"""

from __future__ import annotations

import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpipes.wire import Frame, MessageType, WireError, WireLimits, decode, encode_bytes, frame_length

SEED = 0x1F0A7
N_INPUTS = 100_000
HEADER = 32
DESC = 88
MAX_VALID = WireLimits().max_frame_bytes


def _t(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _corpus() -> list[bytes]:
    """Valid frames of every shape of content: no tensors, one, several, empty, 0-d, 8-d, all dtypes."""
    frames = [
        Frame(MessageType.PING, {"t": 1.5}),
        Frame(MessageType.HELLO, {"node": "n-1", "caps": ["a", "b"], "nested": {"x": [1, 2, {"y": None}]}}),
        Frame(
            MessageType.FORWARD,
            {"session": "s", "step": 3},
            {"hidden": _t(torch.float16, (3, 8), 0), "positions": torch.arange(3)},
        ),
        Frame(
            MessageType.RESULT,
            {"session": "sé", "ok": True},
            {
                "a": _t(torch.bfloat16, (2, 2, 2), 1),
                "b": _t(torch.uint8, (5,), 2),
                "c": _t(torch.int32, (), 3),
                "d": _t(torch.float32, (0, 4), 4),
            },
        ),
        Frame(MessageType.GOSSIP, {}, {f"t{i}": _t(torch.int64, (i + 1,), i) for i in range(6)}),
        Frame(
            MessageType.END_SESSION, {"k": "v" * 70}, {"deep": _t(torch.float32, (1, 1, 1, 1, 1, 1, 2, 3), 5)}
        ),
        Frame(
            MessageType.ERROR,
            {"code": "bad_frame", "message": "x"},
            {"z": torch.zeros(0, dtype=torch.float16)},
        ),
    ]
    return [bytes(encode_bytes(f)) for f in frames]


# Header fields (offset, size) and the fields of descriptor i (relative offset, size).
HEADER_FIELDS = [(4, 2), (6, 2), (8, 4), (12, 4), (16, 4), (20, 4), (24, 8)]
DESC_FIELDS = [(0, 1), (1, 1), (2, 2), (4, 4), (8, 8), (16, 8)] + [(24 + 8 * k, 8) for k in range(8)]
_FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def _extremes(rng: random.Random, size: int, buf: bytearray) -> int:
    top = (1 << (8 * size)) - 1
    values = [0, 1, 2, 3, 7, 8, 9, 63, 64, 65, top, top - 1, top >> 1, (top >> 1) + 1, rng.randint(0, top)]
    if size >= 4:
        n = len(buf)
        values += [n, n - 1, n + 1, n + 64, n - 64, 1 << 16, 64 << 10, (64 << 10) + 1, 1 << 30, (1 << 30) + 1]
    if size == 8:
        values += [1 << 32, 1 << 62, 1 << 63, top - 63, MAX_VALID * 2, 3 << 61]
    return values[rng.randrange(len(values))] & top


def _n_tensors(buf: bytearray) -> int:
    return struct.unpack_from("<I", buf, 16)[0] if len(buf) >= 20 else 0


def _put(buf: bytearray, at: int, size: int, value: int) -> None:
    if at + size <= len(buf):
        struct.pack_into(_FMT[size], buf, at, value)


# ---------------------------------------------------------------- mutators: (rng, buf, corpus) -> buf
def m_bit_flips(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        if buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    return buf


def m_byte_overwrite(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        if buf:
            buf[rng.randrange(len(buf))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return buf


def m_header_field(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    at, size = rng.choice(HEADER_FIELDS)
    _put(buf, at, size, _extremes(rng, size, buf))
    return buf


def m_descriptor_field(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    n = max(1, min(_n_tensors(buf), 16))
    base = HEADER + DESC * rng.randrange(n)
    rel, size = rng.choice(DESC_FIELDS)
    if rel == 1 and rng.random() < 0.5:  # ndim: mostly values around the limit
        _put(buf, base + 1, 1, rng.choice([0, 1, 7, 8, 9, 255]))
    else:
        _put(buf, base + rel, size, _extremes(rng, size, buf))
    return buf


def m_huge_shape(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    """A shape whose product is huge, overflows, or hides behind a zero dimension, with nbytes to match."""
    n = max(1, min(_n_tensors(buf), 16))
    base = HEADER + DESC * rng.randrange(n)
    ndim = rng.randint(1, 8)
    dims = [
        rng.choice([0, 1, 2, 1 << 20, 1 << 30, 1 << 31, 1 << 32, 1 << 62, (1 << 64) - 1]) for _ in range(ndim)
    ]
    _put(buf, base + 1, 1, ndim)
    for k in range(8):
        _put(buf, base + 24 + 8 * k, 8, dims[k] if k < ndim else 0)
    product = 1
    for d in dims:
        product *= d
    _put(buf, base + 16, 8, product % (1 << 64))
    return buf


def m_truncate(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    return buf[: rng.randrange(len(buf) + 1)]


def m_extend(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    n = rng.choice([1, 63, 64, 65, 128, rng.randint(1, 300)])
    fill = bytes(n) if rng.random() < 0.5 else rng.randbytes(n)
    return buf + fill


def m_copy_descriptor(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    """Duplicate a descriptor over another, or insert a copy and claim one more tensor."""
    n = _n_tensors(buf)
    if n == 0 or len(buf) < HEADER + DESC * n:
        return buf
    i, j = rng.randrange(n), rng.randrange(n)
    d = bytes(buf[HEADER + DESC * i : HEADER + DESC * (i + 1)])
    if rng.random() < 0.5:
        buf[HEADER + DESC * j : HEADER + DESC * (j + 1)] = d
    else:
        buf[HEADER + DESC * j : HEADER + DESC * j] = d
        _put(buf, 16, 4, n + 1)
    return buf


def m_swap_descriptors(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    n = _n_tensors(buf)
    if n < 2 or len(buf) < HEADER + DESC * n:
        return buf
    i, j = rng.sample(range(n), 2)
    a = slice(HEADER + DESC * i, HEADER + DESC * (i + 1))
    b = slice(HEADER + DESC * j, HEADER + DESC * (j + 1))
    buf[a], buf[b] = bytes(buf[b]), bytes(buf[a])
    return buf


def m_duplicate_region(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    if len(buf) < 2:
        return buf
    start = rng.randrange(len(buf))
    chunk = bytes(buf[start : start + rng.randint(1, 128)])
    at = rng.randrange(len(buf))
    if rng.random() < 0.5:
        buf[at : at + len(chunk)] = chunk
    else:
        buf[at:at] = chunk
    return buf


def m_splice(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    other = rng.choice(corpus)
    cut = rng.randrange(min(len(buf), len(other)) + 1)
    return buf[:cut] + other[cut:]


_META = [
    b"[]",
    b"null",
    b"1",
    b'"tensors"',
    b'{"tensors": 5}',
    b'{"tensors": ["a", "a"]}',
    b'{"tensors": [1, 2]}',
    b'{"tensors": ["a"]}',
    b'{"tensors": []}',
    b'{"a": "\xff\xfe"}',
    b'{"a": 1e999}',
    b'{"a": 123456789012345678901234567890}',
    b'{"a": NaN}',
    b"{" * 40,
    b"[" * 2000 + b"]" * 2000,
    b'{"a": "\\ud800"}',
    b"\x00\x00\x00",
    b'{"a": 1}  trailing',
]


def m_metadata(rng: random.Random, buf: bytearray, corpus: list[bytes]) -> bytearray:
    """Replace the metadata with hostile JSON (or not-JSON) and fix meta_len to match."""
    n = _n_tensors(buf)
    if len(buf) < HEADER or n > 16:
        return buf
    start = HEADER + DESC * n
    old_len = min(struct.unpack_from("<I", buf, 12)[0], max(len(buf) - start, 0))
    new = rng.choice(_META)
    if rng.random() < 0.5 and len(new) <= old_len:  # same length: padded with spaces, nothing moves
        new = new.ljust(old_len)
    buf[start : start + old_len] = new
    _put(buf, 12, 4, len(new))
    return buf


MUTATORS: list[Callable[[random.Random, bytearray, list[bytes]], bytearray]] = [
    m_bit_flips,
    m_byte_overwrite,
    m_header_field,
    m_header_field,
    m_descriptor_field,
    m_descriptor_field,
    m_huge_shape,
    m_truncate,
    m_extend,
    m_copy_descriptor,
    m_swap_descriptors,
    m_duplicate_region,
    m_splice,
    m_metadata,
]


def mutate(rng: random.Random, corpus: list[bytes]) -> bytearray:
    """One fuzz input: 1-3 mutations of a valid frame; often the frame length is then made to agree with
    the buffer, so that the input gets past the length check and reaches the descriptor checks."""
    buf = bytearray(rng.choice(corpus))
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        buf = rng.choice(MUTATORS)(rng, buf, corpus)
    if rng.random() < 0.5:
        _put(buf, 24, 8, len(buf))
    return buf


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_one(buf: bytearray) -> str | None:
    """Decode one input under the contract; the refusal message with numbers blanked out, or None if
    it decoded (and its re-encoding decoded to the same frame)."""
    try:
        length = frame_length(bytes(buf[:HEADER]))
    except WireError:
        length = None
    try:
        frame = decode(buf)
    except WireError as exc:
        return re.sub(r"\d+", "N", str(exc))
    assert length == len(buf), "decode accepted a frame whose header check disagrees with its length"
    again = decode(encode_bytes(frame))
    assert again.type == frame.type and again.meta == frame.meta
    assert list(again.tensors) == list(frame.tensors)
    for name, t in frame.tensors.items():
        u = again.tensors[name]
        assert u.dtype == t.dtype and u.shape == t.shape and _raw(u) == _raw(t)
    return None


def _vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmSize, VmRSS, VmPeak, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def test_seeded_mutation_fuzz_100k():
    """100,000 mutated frames: every one decodes and round-trips, or is a WireError; the decoder's
    checks are all reached; memory stays flat over the run (nothing sized by a claimed length)."""
    corpus = _corpus()
    for buf in corpus:
        assert check_one(bytearray(buf)) is None
    rng = random.Random(SEED)
    refusals: Counter[str] = Counter()
    accepted = 0
    rss0, size0 = _vm_kib("VmRSS"), _vm_kib("VmSize")
    rss_max, size_max = rss0, size0
    started = time.perf_counter()
    for i in range(N_INPUTS):
        buf = mutate(rng, corpus)
        try:
            why = check_one(buf)
        except Exception as exc:  # noqa: BLE001 - any other exception is the bug being hunted
            raise AssertionError(f"input {i} (seed {SEED}) broke the contract: {bytes(buf)!r}") from exc
        if why is None:
            accepted += 1
        else:
            refusals[why] += 1
        if i % 2000 == 0:
            rss_max, size_max = max(rss_max, _vm_kib("VmRSS")), max(size_max, _vm_kib("VmSize"))
    elapsed = time.perf_counter() - started
    rss_max, size_max = max(rss_max, _vm_kib("VmRSS")), max(size_max, _vm_kib("VmSize"))
    # Both outcomes are exercised in volume, and most of the validator's distinct checks fire.
    assert accepted > 1000 and sum(refusals.values()) > N_INPUTS // 2, (accepted, refusals.most_common(5))
    assert len(refusals) >= 25, sorted(refusals)
    # No input made the process map or touch memory in proportion to a claimed size (1 GiB and up).
    assert rss_max - rss0 < 64 << 10, f"RSS grew by {(rss_max - rss0) >> 10} MiB over the fuzz run"
    assert size_max - size0 < 256 << 10, f"virtual size grew by {(size_max - size0) >> 10} MiB"
    assert elapsed < 120, f"{N_INPUTS} inputs took {elapsed:.0f} s"


def _claiming(frame: bytes, **fields: int) -> bytearray:
    """A copy of ``frame`` with descriptor-0 / header fields overwritten (names as in the spec)."""
    at = {"frame_len": (24, 8), "meta_len": (12, 4), "n_tensors": (16, 4), "offset": (HEADER + 8, 8)}
    at |= {
        "nbytes": (HEADER + 16, 8),
        "dim0": (HEADER + 24, 8),
        "dim1": (HEADER + 32, 8),
        "ndim": (HEADER + 1, 1),
    }
    buf = bytearray(frame)
    for name, value in fields.items():
        off, size = at[name]
        struct.pack_into(_FMT[size], buf, off, value)
    return buf


GIB = 1 << 30


@pytest.mark.parametrize(
    ("fields", "cut", "match"),
    [
        # A 1 GiB frame (exactly at the limit) claimed by a ~100-byte buffer.
        ({"frame_len": GIB}, None, "the header says"),
        # A 1 GiB uint8 tensor claimed in a frame whose header says it is small.
        ({"dim0": GIB, "nbytes": GIB}, None, "past the end"),
        # Both: header and descriptor agree on a 1 GiB tensor; the buffer has 100-odd bytes.
        ({"dim0": GIB - 512, "nbytes": GIB - 512, "frame_len": GIB}, None, "the header says"),
        # Just past the frame limit, and the largest 64-bit length.
        ({"frame_len": GIB + 1}, HEADER, "exceeds the limit"),
        ({"frame_len": 2**64 - 1}, HEADER, "exceeds the limit"),
        # Huge metadata and tensor counts are refused from the header alone.
        ({"meta_len": 2**32 - 1}, HEADER, "metadata of"),
        ({"n_tensors": 2**32 - 1}, HEADER, "tensors exceed"),
        # A zero dimension beside a 2^64-1 one: nbytes 0, but no receiver could build that shape.
        ({"ndim": 2, "dim0": 0, "dim1": 2**64 - 1, "nbytes": 0}, None, "overflows 63 bits"),
    ],
)
def test_huge_claims_fail_fast_without_allocating(fields, cut, match):
    small = bytes(encode_bytes(Frame(MessageType.FORWARD, {}, {"x": torch.zeros(4, dtype=torch.uint8)})))
    buf = _claiming(small, **fields)
    if cut is not None:
        buf = buf[:cut]
    assert len(buf) < 200
    peak0, size0 = _vm_kib("VmHWM"), _vm_kib("VmSize")
    started = time.perf_counter()
    for _ in range(1000):
        with pytest.raises(WireError, match=match):
            decode(buf) if cut is None else frame_length(buf)
    per_call = (time.perf_counter() - started) / 1000
    assert per_call < 2e-3, f"{per_call * 1e3:.2f} ms per refusal"
    assert _vm_kib("VmHWM") - peak0 < 16 << 10 and _vm_kib("VmSize") - size0 < 64 << 10


def test_regression_zero_dim_beside_huge_dims():
    """Found by the fuzzer: an empty tensor whose other dimensions overflow int64 passed validation
    (nbytes 0) and then made torch raise TypeError/RuntimeError instead of WireError."""
    base = bytes(encode_bytes(Frame(MessageType.FORWARD, {}, {"x": torch.zeros(0, 3)})))
    for dims in [(0, 2**64 - 1), (0, 2**63), (2**63, 0), (0, 2**62, 2**62), (0, 2**30, 2**30, 2**30)]:
        buf = bytearray(base)
        struct.pack_into("<B", buf, HEADER + 1, len(dims))
        for k, d in enumerate(dims):
            struct.pack_into("<Q", buf, HEADER + 24 + 8 * k, d)
        with pytest.raises(WireError, match="overflows 63 bits"):
            decode(buf)
    buf = bytearray(base)  # the largest empty shape that fits stays valid
    struct.pack_into("<Q", buf, HEADER + 32, 2**61 - 1)
    assert decode(buf).tensors["x"].shape == (0, 2**61 - 1)


@pytest.mark.slow
@settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.randoms(use_true_random=False))
def test_hypothesis_mutation_fuzz(rng):
    """The same mutations with hypothesis choosing them (and shrinking any failure to a small case)."""
    check_one(mutate(rng, _CORPUS))


_CORPUS = _corpus()

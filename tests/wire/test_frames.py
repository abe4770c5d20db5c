"""The frame format (docs/wire-format.md): round trips without copies, and every malformed frame is a
WireError — never a crash, never an allocation sized by unchecked input."""

from __future__ import annotations

import struct

import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpipes.wire import (
    Frame,
    MessageType,
    WireError,
    WireLimits,
    check_tensor,
    decode,
    encode,
    encode_bytes,
    frame_length,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.uint8]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 3), (2, 3, 5), (1, 1, 1, 1, 1, 1, 1, 2)])
def test_round_trip(dtype, shape):
    t = _tensor(dtype, shape)
    frame = Frame(MessageType.FORWARD, {"session": "s", "step": 3}, {"x": t, "pos": torch.arange(4)})
    buf = encode_bytes(frame)
    assert frame_length(buf[:32]) == len(buf)
    got = decode(buf)
    assert got.type == MessageType.FORWARD and got.meta == {"session": "s", "step": 3}
    assert list(got.tensors) == ["x", "pos"]
    assert got.tensors["x"].dtype == dtype and got.tensors["x"].shape == t.shape
    assert torch.equal(got.tensors["x"], t) and torch.equal(got.tensors["pos"], torch.arange(4))


def test_encode_hands_over_the_tensor_memory_and_decode_returns_views():
    hidden = torch.randn(16, 64).half()
    parts = encode(Frame(MessageType.RESULT, {"session": "s"}, {"hidden": hidden}))
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 1
    assert views[0].obj is not None and views[0].nbytes == hidden.numel() * 2
    hidden[0, 0] = 42.0  # the encoder did not copy: the view sees the change
    assert torch.frombuffer(views[0], dtype=torch.float16)[0].item() == 42.0

    buf = bytearray()
    for p in parts:
        buf += p
    got = decode(buf)
    t = got.tensors["hidden"]
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert base <= t.data_ptr() < base + len(buf)  # a view into the received buffer
    assert (t.data_ptr() - base) % 64 == 0
    buf[t.data_ptr() - base] ^= 0xFF
    assert not torch.equal(t, hidden)


def test_control_frames_and_limits():
    buf = encode_bytes(Frame(MessageType.PING, {"t": 1.5}))
    assert len(buf) % 64 == 0 and decode(buf).meta == {"t": 1.5}
    tight = WireLimits(max_frame_bytes=1024, max_meta_bytes=128, max_tensors=1)
    with pytest.raises(WireError, match="exceeds the limit"):
        encode(Frame(MessageType.FORWARD, {}, {"x": torch.zeros(1024)}), tight)
    with pytest.raises(WireError, match="metadata"):
        encode(Frame(MessageType.PING, {"pad": "x" * 200}), tight)
    with pytest.raises(WireError, match="tensors exceed"):
        encode(Frame(MessageType.FORWARD, {}, {"a": torch.zeros(1), "b": torch.zeros(1)}), tight)
    big = encode_bytes(Frame(MessageType.FORWARD, {}, {"x": torch.zeros(1024)}))
    with pytest.raises(WireError, match="exceeds the limit"):
        frame_length(big[:32], tight)
    with pytest.raises(WireError, match="cannot be sent"):
        encode(Frame(MessageType.FORWARD, {}, {"x": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(WireError, match="contiguous"):
        encode(Frame(MessageType.FORWARD, {}, {"x": torch.zeros(4, 4).t()}))
    with pytest.raises(WireError, match="reserved"):
        encode(Frame(MessageType.PING, {"tensors": []}))


def _valid() -> bytearray:
    return encode_bytes(
        Frame(
            MessageType.FORWARD,
            {"session": "s"},
            {"hidden": torch.ones(3, 8).half(), "positions": torch.arange(3)},
        )
    )


def _patch(buf: bytearray, offset: int, fmt: str, value: int) -> bytearray:
    out = bytearray(buf)
    struct.pack_into("<" + fmt, out, offset, value)
    return out


D0 = 32  # first descriptor
D1 = 32 + 88


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: _patch(b, 4, "H", 2), "unsupported version 2"),
        (lambda b: _patch(b, 6, "H", 0), "unknown message type"),
        (lambda b: _patch(b, 6, "H", 999), "unknown message type"),
        (lambda b: _patch(b, 8, "I", 1), "unknown flags"),
        (lambda b: _patch(b, 12, "I", 1 << 30), "metadata of"),
        (lambda b: _patch(b, 16, "I", 1000), "tensors exceed"),
        (lambda b: _patch(b, 20, "I", 7), "reserved header"),
        (lambda b: _patch(b, 24, "Q", 2**64 - 1), "exceeds the limit"),
        (lambda b: _patch(b, 24, "Q", 40), "shorter than its header"),
        (lambda b: _patch(b, 24, "Q", len(b) + 64), "the header says"),
        (lambda b: b[:-1], "the header says"),
        (lambda b: b[:20], "truncated header"),
        (lambda b: b + b"\0" * 64, "the header says"),
        (lambda b: _patch(b, D0, "B", 0), "unknown dtype"),
        (lambda b: _patch(b, D0 + 1, "B", 9), "ndim"),
        (lambda b: _patch(b, D0 + 2, "H", 1), "reserved fields"),
        (lambda b: _patch(b, D0 + 8, "Q", 65), "aligned"),
        (lambda b: _patch(b, D0 + 8, "Q", 0), "overlaps"),
        (lambda b: _patch(b, D0 + 16, "Q", 1), "does not match"),
        (lambda b: _patch(_patch(b, D0 + 24, "Q", 2**62), D0 + 32, "Q", 2**62), "overflows"),
        (lambda b: _patch(b, D0 + 24 + 8 * 7, "Q", 5), "past ndim"),
        (lambda b: _patch(_patch(b, D1 + 24, "Q", 10**6), D1 + 16, "Q", 8 * 10**6), "past the end"),
        (lambda b: _patch(b, D1 + 8, "Q", 2**64 - 64), "past the end"),
    ],
)
def test_malformed_frames_are_rejected(mutate, match):
    with pytest.raises(WireError, match=match):
        decode(bytearray(mutate(_valid())))


def test_bad_metadata_is_rejected():
    def with_meta(meta: bytes) -> bytearray:
        good = encode_bytes(Frame(MessageType.PING, {"m": "x" * (len(meta) - 8)}))
        off = 32
        out = bytearray(good)
        out[off : off + len(meta)] = meta
        struct.pack_into("<I", out, 12, len(meta))
        return out

    with pytest.raises(WireError, match="not valid JSON"):
        decode(with_meta(b"{not json!!!!}"))
    with pytest.raises(WireError, match="not a JSON object"):
        decode(with_meta(b"[1, 2, 3, 4, 5, 6, 7]"))
    with pytest.raises(WireError, match="not valid JSON"):
        decode(with_meta(b'{"a": "\xff\xfe"}      '))
    buf = _valid()
    meta_start = 32 + 2 * 88
    meta_len = struct.unpack_from("<I", buf, 12)[0]
    meta = orjson.loads(bytes(buf[meta_start : meta_start + meta_len]))
    meta["tensors"] = ["hidden", "hidden"]
    raw = orjson.dumps(meta)
    assert len(raw) <= meta_len
    buf[meta_start : meta_start + meta_len] = raw.ljust(meta_len)
    with pytest.raises(WireError, match="unique"):
        decode(buf)


def test_check_tensor():
    frame = decode(_valid())
    assert check_tensor(frame, "hidden", dtypes=[torch.float16], shape=[None, 8]).shape == (3, 8)
    with pytest.raises(WireError, match="missing tensor"):
        check_tensor(frame, "ids", dtypes=[torch.int64], shape=[None])
    with pytest.raises(WireError, match="dtype"):
        check_tensor(frame, "positions", dtypes=[torch.int32], shape=[None])
    with pytest.raises(WireError, match="shape"):
        check_tensor(frame, "hidden", dtypes=[torch.float16], shape=[None, 16])


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_never_crash(data):
    try:
        frame_length(data)
    except WireError:
        pass
    try:
        decode(bytearray(data))
    except WireError:
        pass


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_frames_never_crash(data):
    buf = _valid()
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(buf))))
    if cut is not None:
        buf = buf[:cut]
    try:
        frame = decode(buf)
    except WireError:
        return
    for t in frame.tensors.values():  # whatever decodes is readable in full
        t.sum()


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=4)), max_size=5),
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "tensors"), st.integers(-(2**63), 2**63 - 1), max_size=4
    ),
)
def test_fuzz_round_trip(specs, meta):
    tensors = {f"t{i}": _tensor(dt, tuple(shape), i) for i, (dt, shape) in enumerate(specs)}
    got = decode(encode_bytes(Frame(MessageType.GOSSIP, meta, tensors)))
    assert got.meta == meta and list(got.tensors) == list(tensors)
    for name, t in tensors.items():
        assert got.tensors[name].dtype == t.dtype and torch.equal(got.tensors[name], t)

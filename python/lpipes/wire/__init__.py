"""The Python face of the lpipes frame format (``docs/wire-format.md``).

:func:`encode` lays a frame out with the native encoder and returns the buffers to write in
order: a small prefix and, per tensor, a zero-copy view of the tensor's own memory and its
padding. :func:`frame_length` validates a header before the receiver allocates anything, and
:func:`decode` validates a whole frame and returns its tensors as views into the received buffer.
Every malformed input raises :class:`WireError`; nothing from the network is trusted before the
native validator has checked it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch

from lpipes import _C
from lpipes.errors import LpipesError

HEADER_BYTES = 32
ALIGN = 64


class WireError(LpipesError, ValueError):
    """A frame is malformed, exceeds a limit, or cannot be encoded."""


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    FORWARD = 3
    RESULT = 4
    END_SESSION = 5
    ERROR = 6
    PING = 7
    PONG = 8
    GOSSIP = 9


_TO_WIRE = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for dt, code in _TO_WIRE.items()}
_NUMPY_DTYPES = frozenset(_TO_WIRE) - {torch.bfloat16}  # Tensor.numpy() has no bfloat16


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts (and a sender may produce)."""

    max_frame_bytes: int = 1 << 30
    max_meta_bytes: int = 64 << 10
    max_tensors: int = 16

    def args(self) -> tuple[int, int, int]:
        return self.max_frame_bytes, self.max_meta_bytes, self.max_tensors


DEFAULT_LIMITS = WireLimits()


@dataclass
class Frame:
    """One message: its type, a JSON-object metadata dict and named tensors.

    Tensor names are carried in the metadata (key ``"tensors"``: the list of names in order), so the
    tensors of a frame are addressed by name on both sides.
    """

    type: MessageType
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's own memory as a flat byte memoryview (no copy; the tensor must be contiguous)."""
    if t.device.type != "cpu":
        raise WireError(f"tensors must be on the CPU to be sent, got {t.device}")
    if not t.is_contiguous():
        raise WireError("tensors must be contiguous to be sent without a copy; call .contiguous() first")
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in _NUMPY_DTYPES:  # one torch call instead of three (this runs for every frame sent)
        return memoryview(t.numpy()).cast("B") if t.dim() else memoryview(t.reshape(1).numpy()).cast("B")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode(frame: Frame, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """The frame as a list of buffers to write in order (scatter-gather; tensor bytes are not copied).

    The tensors must stay unmodified until the buffers are written.
    """
    if "tensors" in frame.meta:
        raise WireError("metadata key 'tensors' is reserved for the tensor names")
    specs = []
    for name, t in frame.tensors.items():
        code = _TO_WIRE.get(t.dtype)
        if code is None:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot be sent")
        specs.append((code, list(t.shape)))
    meta = dict(frame.meta)
    if frame.tensors:
        meta["tensors"] = list(frame.tensors)
    try:
        meta_bytes = orjson.dumps(meta)
        prefix, _offsets, pads = _C.wire_encode_prefix(int(frame.type), meta_bytes, specs, *limits.args())
    except (orjson.JSONEncodeError, _C.NativeError, TypeError) as exc:
        raise WireError(str(exc)) from None
    out: list[bytes | memoryview] = [prefix]
    for t, pad in zip(frame.tensors.values(), pads):
        out.append(_bytes_view(t))
        if pad:
            out.append(bytes(pad))
    return out


def encode_bytes(frame: Frame, limits: WireLimits = DEFAULT_LIMITS) -> bytearray:
    """The frame in one buffer (a copy; for tests and small control messages)."""
    out = bytearray()
    for part in encode(frame, limits):
        out += part
    return out


def frame_length(header: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> int:
    """Validate a frame's header (its first 32 bytes) and return the frame's total length."""
    try:
        return int(_C.wire_frame_length(header, *limits.args()))
    except _C.NativeError as exc:
        raise WireError(str(exc)) from None


def decode(buffer: bytearray | memoryview | Any, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """Validate a whole frame and return it; tensors are views into ``buffer`` (no copy).

    ``buffer`` must be writable (a ``bytearray``, a memoryview of one, a numpy or torch uint8 array)
    and exactly one frame long. Read-only ``bytes`` are copied once into a ``bytearray``.
    """
    if isinstance(buffer, bytes):
        buffer = bytearray(buffer)
    try:
        mtype, _flags, meta_off, meta_len, tensors = _C.wire_parse(buffer, *limits.args())
    except (_C.NativeError, BufferError, TypeError) as exc:
        raise WireError(str(exc)) from None
    view = memoryview(buffer).cast("B")
    try:
        meta = orjson.loads(view[meta_off : meta_off + meta_len])
    except orjson.JSONDecodeError as exc:
        raise WireError(f"frame: metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise WireError("frame: metadata is not a JSON object")
    names = meta.pop("tensors", [])
    if (
        not isinstance(names, list)
        or len(names) != len(tensors)
        or not all(isinstance(n, str) for n in names)
    ):
        raise WireError(f"frame: metadata 'tensors' must list the names of its {len(tensors)} tensors")
    if len(set(names)) != len(names):
        raise WireError("frame: tensor names must be unique")
    out: dict[str, torch.Tensor] = {}
    for name, (code, shape, offset, nbytes) in zip(names, tensors):
        dtype = _FROM_WIRE[code]
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(view, dtype=dtype, count=nbytes // _ITEMSIZE[code], offset=offset)
        out[name] = raw if len(shape) == 1 else raw.view(shape)
    return Frame(MessageType(mtype), meta, out)


def check_tensor(
    frame: Frame,
    name: str,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None],
) -> torch.Tensor:
    """The named tensor of a received frame, checked against an expected dtype set and shape
    (``None`` entries match any size); raises :class:`WireError` otherwise."""
    t = frame.tensors.get(name)
    if t is None:
        raise WireError(f"{frame.type.name}: missing tensor {name!r}")
    if t.dtype not in dtypes:
        raise WireError(
            f"{frame.type.name}: tensor {name!r} has dtype {t.dtype}, expected one of {list(dtypes)}"
        )
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise WireError(
            f"{frame.type.name}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
        )
    return t


def error_frame(code: str, message: str, **extra: Any) -> Frame:
    return Frame(MessageType.ERROR, {"code": code, "message": message, **extra})


__all__ = [
    "DEFAULT_LIMITS",
    "Frame",
    "MessageType",
    "WireError",
    "WireLimits",
    "check_tensor",
    "decode",
    "encode",
    "encode_bytes",
    "error_frame",
    "frame_length",
]

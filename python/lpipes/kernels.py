"""Thin torch wrappers of the native CPU kernels (``lpipes._C``).

Activations are float32, weights float16 (as stored in checkpoints); every kernel accumulates in fp32.
The wrappers allocate outputs with torch when ``out`` is not given and flatten leading dimensions
(without copying, except that ``linear`` makes ``x`` contiguous); the native code validates dtypes,
shapes, contiguity and aliasing and raises ``lpipes._C.NativeError`` (a ValueError) naming the
offending argument. Kernels run on lpipes' own thread pool (``lpipes._C.set_num_threads``).

Every function takes ``isa``: ``"auto"`` (the best variant this CPU supports: avx512 > avx2 > scalar),
or ``"scalar"``, ``"avx2"``, ``"avx512"`` to force one (a variant the CPU lacks raises NativeError).
"""

from __future__ import annotations

import math

import torch

from lpipes import _C

__all__ = [
    "act_mul",
    "f16_to_f32",
    "f32_to_f16",
    "linear",
    "read_memory",
    "resolve_isa",
    "rms_norm",
    "rope_",
]


def _rows(t: torch.Tensor, name: str, cols: int) -> torch.Tensor:
    """``t`` as a 2-D ``[-1, cols]`` view (no copy); the native code checks dtype and shape."""
    if t.dim() == 2 or cols == 0 or t.numel() % cols:
        return t  # let the native checks report the shape (or nothing to do)
    if not t.is_contiguous():
        raise _C.NativeError(f"{name}: expected a contiguous tensor (shape {list(t.shape)})")
    return t.view(-1, cols)


def resolve_isa(isa: str = "auto") -> str:
    """The kernel variant ``isa`` resolves to on this CPU: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    return _C.resolve_isa(isa)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    isa: str = "auto",
) -> torch.Tensor:
    """``out = x @ w.T (+ bias) (+ out if accumulate)`` with fp16 weights and fp32 accumulation.

    Args:
        x: float32 ``[..., K]`` activations (made contiguous if needed).
        w: float16 ``[N, K]`` weight (an ``nn.Linear`` weight: ``[out_features, in_features]``), contiguous.
        bias: optional float32 ``[N]``.
        out: optional float32 ``[..., N]`` contiguous output (same leading dims as ``x``); required
            when ``accumulate`` (the residual add: ``out += x @ w.T + bias``).
        accumulate: add the product into ``out`` instead of overwriting it.
        isa: kernel variant.

    Returns:
        float32 ``[..., N]`` (``out`` when given).
    """
    K = x.shape[-1]
    N = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), K).contiguous()
    if out is None:
        if accumulate:
            raise ValueError("linear: accumulate=True needs out=")
        out = torch.empty(*lead, N, dtype=torch.float32)
    _C.linear_f16(x2, w, _rows(out, "out", N), bias, accumulate, isa)
    return out


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    offset: float = 0.0,
    out: torch.Tensor | None = None,
    isa: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the last dimension, in fp32 as HF computes it.

    ``out = x * rsqrt(mean(x**2, -1) + eps) * (weight + offset)`` (offset 1.0 for Gemma's ``1 + w``
    norms; ``weight=None``: no scale). Also usable per head (q/k norms) with ``x`` of shape
    ``[..., heads, head_dim]``.

    Args:
        x: float32 ``[..., N]``, contiguous.
        weight: float32 ``[N]`` or None.
        eps: the epsilon inside the square root.
        offset: added to ``weight``.
        out: optional float32 output of the shape of ``x``; may be ``x`` itself (in place).
        isa: kernel variant.

    Returns:
        float32 ``[..., N]`` (``out`` when given).
    """
    N = x.shape[-1]
    if out is None:
        out = torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)
    _C.rms_norm(_rows(x, "x", N), weight, float(eps), float(offset), _rows(out, "out", N), isa)
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, isa: str = "auto") -> torch.Tensor:
    """Apply rotary position embedding (HF ``rotate_half`` layout) to ``x`` in place.

    Args:
        x: float32 ``[T, heads, head_dim]``, contiguous; rotated in place.
        cos: float32 ``[T, rot]`` (or ``[1, T, rot]`` as transformers' rotary modules return it), with
            ``rot <= head_dim`` even; dimensions ``>= rot`` of each head are left untouched.
        sin: float32, same shape as ``cos``.
        isa: kernel variant.

    Returns:
        ``x``.
    """
    rot = cos.shape[-1]
    _C.rope(x, cos.reshape(-1, rot), sin.reshape(-1, rot), isa)
    return x


def act_mul(
    gate_up: torch.Tensor, act: str = "silu", *, out: torch.Tensor | None = None, isa: str = "auto"
) -> torch.Tensor:
    """Gated MLP activation: ``out = act(gate) * up`` where ``gate_up = [gate | up]`` on the last dim.

    Args:
        gate_up: float32 ``[..., 2 * I]``, contiguous (the fused gate/up projection output).
        act: ``"silu"`` (x * sigmoid(x), llama family) or ``"gelu_tanh"`` (torch
            ``gelu(approximate="tanh")``, gemma).
        out: optional float32 ``[..., I]`` contiguous output; must not overlap ``gate_up``.
        isa: kernel variant.

    Returns:
        float32 ``[..., I]`` (``out`` when given).
    """
    two_i = gate_up.shape[-1]
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], two_i // 2, dtype=torch.float32)
    _C.act_mul(_rows(gate_up, "gate_up", two_i), _rows(out, "out", two_i // 2), act, isa)
    return out


def f16_to_f32(src: torch.Tensor, *, out: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
    """Convert float16 ``src`` (any shape, contiguous) to a float32 tensor of the same shape.

    ``out``: optional float32 contiguous tensor with as many elements as ``src``.
    """
    if out is None:
        out = torch.empty(src.shape, dtype=torch.float32)
    _C.f16_to_f32(src, out, isa)
    return out


def f32_to_f16(src: torch.Tensor, *, out: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
    """Convert float32 ``src`` (any shape, contiguous) to float16, rounding to nearest even.

    ``out``: optional float16 contiguous tensor with as many elements as ``src``.
    """
    if out is None:
        out = torch.empty(src.shape, dtype=torch.float16)
    _C.f32_to_f16(src, out, isa)
    return out


def read_memory(buf: torch.Tensor, *, isa: str = "auto") -> float:
    """Read every byte of the contiguous tensor ``buf`` (any dtype) with all kernel threads.

    Returns a checksum (wrapping sum of its 64-bit words, then of its trailing bytes) so the reads
    cannot be optimised away; timing it measures the machine's memory read bandwidth.
    """
    return _C.read_memory(buf, isa)

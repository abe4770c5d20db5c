"""An in-process model of the network: every span is its own executor, built from the checkpoint alone.

``lpipes generate --split`` uses it; it passes hidden states between spans exactly as
peers will, so it is the reference for what a distributed run must produce.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from lpipes.errors import LpipesError
from lpipes.generation.loop import Generator, Stage
from lpipes.models.checkpoint import Checkpoint, open_checkpoint
from lpipes.models.end_model import EndModel
from lpipes.models.modules import parse_dtype
from lpipes.runtime.native import NativeExecutor, native_support
from lpipes.runtime.reference import ReferenceExecutor, split_points_to_spans

log = logging.getLogger(__name__)

ExecutorKind = Literal["auto", "native", "reference"]


def make_executor(
    ckpt: Checkpoint,
    start: int,
    end: int,
    *,
    dtype: str | torch.dtype,
    executor: ExecutorKind = "auto",
    kv_cache_bytes: int | None = None,
) -> Stage:
    """A span executor: ``native`` (fused fp16 llama-family span), ``reference`` (transformers' layers),
    or ``auto``: native when the architecture and dtype allow, else reference."""
    if executor not in ("auto", "native", "reference"):
        raise LpipesError(f"executor must be auto, native or reference; got {executor!r}")
    reason = native_support(ckpt, dtype) if executor != "reference" else "reference requested"
    if executor == "native" and reason is not None:
        raise LpipesError(f"the native executor does not support {reason}; use --executor reference")
    if reason is None:
        kwargs = {"kv_cache_bytes": kv_cache_bytes} if kv_cache_bytes else {}
        return NativeExecutor(ckpt, start, end, dtype=dtype, **kwargs)
    if executor == "auto":
        log.info("layers [%d, %d): reference executor (native does not support %s)", start, end, reason)
    kwargs = {"kv_cache_bytes": kv_cache_bytes} if kv_cache_bytes else {}
    return ReferenceExecutor(ckpt, start, end, dtype=dtype, **kwargs)


def resolve_dtype(
    ckpt: Checkpoint, dtype: str | torch.dtype, executor: ExecutorKind = "auto"
) -> str | torch.dtype:
    """``auto`` → float16 where the native executor runs the architecture (and ``executor`` allows it),
    else float32; any other dtype is returned unchanged."""
    if dtype != "auto":
        return dtype
    native_ok = executor != "reference" and native_support(ckpt, "float16") is None
    return "float16" if native_ok else "float32"


def weight_bytes(ckpt: Checkpoint, start: int, end: int, dtype: str | torch.dtype) -> int:
    """Bytes the weights of layers ``[start, end)`` take in ``dtype`` (from the file headers)."""
    names = [n for i in range(start, end) for n in ckpt.layer_tensor_names(i)]
    return ckpt.tensor_numel(names) * parse_dtype(dtype).itemsize


def build_local_generator(
    model: str | Path,
    *,
    split: Sequence[int] = (),
    dtype: str | torch.dtype = "float32",
    executor: ExecutorKind = "auto",
    revision: str | None = None,
    kv_cache_bytes: int | None = None,
) -> Generator:
    """An end model plus one executor per span, each opening the checkpoint on its own.

    Args:
        model: local directory or hub id.
        split: layer indices where the model is cut, e.g. ``[2, 4]`` → spans [0,2), [2,4), [4,n).
        dtype: float32, float16, bfloat16, or ``auto``: float16 where the native executor runs the
            architecture (and ``executor`` allows it), else float32.
        executor: ``auto`` (native where supported), ``native`` or ``reference``.
        kv_cache_bytes: each span's paged KV pool budget (default 512 MiB).
    """
    end_ckpt = open_checkpoint(model, end_model=True, revision=revision)
    dtype = resolve_dtype(end_ckpt, dtype, executor)
    spans = split_points_to_spans(end_ckpt.num_layers, list(split))
    # Open (and so validate) every span before loading any weights.
    ckpts = [open_checkpoint(model, layers=span, end_model=False, revision=revision) for span in spans]
    stages = [
        make_executor(ckpt, *span, dtype=dtype, executor=executor, kv_cache_bytes=kv_cache_bytes)
        for ckpt, span in zip(ckpts, spans)
    ]
    # With native spans the LM head uses the same fp16 GEMV (a quarter of the bytes read per token
    # for small models).
    native = all(isinstance(s, NativeExecutor) for s in stages)
    end = EndModel(end_ckpt, dtype=dtype, native_head=native)
    return Generator(end, stages)

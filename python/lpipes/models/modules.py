"""Building transformers' own modules for a layer span from a checkpoint, without the full model.

Layers are constructed on the meta device (no memory), then the span's tensors are
assigned in place (``load_state_dict(assign=True)``), so a node holding layers
``[start, end)`` never materialises anything else.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lpipes.errors import CheckpointError
from lpipes.models.checkpoint import Checkpoint
from lpipes.progress import track

_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"`` / ``"fp16"`` / ``torch.float16`` → ``torch.float16`` (also bf16, fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: choose float32, float16 or bfloat16") from None


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-MoE: per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (as stored on disk)
    → fused ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``mlp.experts.down_proj`` [E, H, I]
    (as the module holds them). Tensors already fused pass through unchanged.
    """
    experts: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            out[name] = t
    if experts:
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[e]) != 3 for e in ids):
            raise CheckpointError(
                f"incomplete expert tensors: experts {ids} with parts {[sorted(experts[e]) for e in ids]}"
            )
        out["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in ids]
        )
        out["mlp.experts.down_proj"] = torch.stack([experts[e]["down"] for e in ids])
    return out


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    # Unexpected keys are tolerated: e.g. Gemma 4 KV-shared layers compute no K/V, but some
    # checkpoints still store their k/v projections.
    missing, _unexpected = module.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{what}: checkpoint lacks tensors {still_meta} (missing keys: {missing})")


def load_decoder_layers(
    ckpt: Checkpoint, start: int, end: int, *, dtype: torch.dtype, config: Any | None = None
) -> nn.ModuleList:
    """Build decoder layers ``[start, end)`` (absolute indices) with only their own tensors.

    ``config`` defaults to the checkpoint's text config; pass a copy to change the
    attention implementation without touching the checkpoint's.
    """
    config = config if config is not None else ckpt.text_config
    cls = ckpt.arch.decoder_layer_cls
    wanted = {i: ckpt.layer_tensor_names(i) for i in range(start, end)}
    for i, names in wanted.items():
        if not names:
            raise CheckpointError(f"{ckpt.path}: no tensors for layer {i} under prefix {ckpt.prefix!r}")
    tensors = ckpt.load_tensors(n for names in wanted.values() for n in names)
    layers = []
    for i, names in track(wanted.items(), f"loading layers [{start}, {end})", total=len(wanted)):
        head = f"{ckpt.prefix}layers.{i}."
        state = {n[len(head) :]: tensors[n] for n in names}
        if ckpt.arch.fused_experts:
            state = fuse_experts(state)
        with torch.device("meta"):
            layer = cls(config, layer_idx=i)
        _assign(layer, state, f"layer {i}")
        layer.to(dtype)
        layer.eval()
        layer.requires_grad_(False)
        layers.append(layer)
    return nn.ModuleList(layers)

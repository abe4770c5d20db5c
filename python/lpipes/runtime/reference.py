"""The reference layer executor: transformers' own decoder layers over lpipes' KV cache.

It runs any contiguous span ``[start, end)`` of a supported decoder for a batch of
sessions. Each call gets, per session, the new tokens' hidden states and their
positions; the executor keeps each session's K/V between calls. The math is
transformers' own layer code; lpipes supplies the parts the full model normally
builds: RoPE cos/sin per layer type, explicit attention masks (causal, padding,
sliding window — never ``None`` on multi-token chunks) and the cache, plugged in
through a registered attention function (``"lpipes_ref"``).

Batching: sequences of different lengths are left-padded to a common length Q; the
K/V of each session is kept without padding and gathered right-padded to K, with
the mask sized [B, 1, Q, K] over those cache indices.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lpipes.errors import ContextLengthError, LayerSpanError, SessionError
from lpipes.models.arch import attention_window, check_span, kv_producers, layer_types, rope_couples_sequences
from lpipes.models.checkpoint import Checkpoint
from lpipes.models.modules import load_decoder_layers, parse_dtype
from lpipes.runtime.kv import KVCache, SessionId
from lpipes.runtime.paged import DEFAULT_KV_CACHE_BYTES, PagedKVCache, layer_shapes_of

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "lpipes_ref"


@dataclass
class SequenceInput:
    """One session's new tokens for one executor call.

    Attributes:
        session_id: the session; its K/V cache is created on first use.
        hidden: [T, hidden_size] hidden states entering layer ``start``.
        positions: [T] int64 absolute positions (RoPE) of these tokens.
        per_layer: [T, end - start, P] Gemma 4 per-layer inputs for this span, else None.
    """

    session_id: SessionId
    hidden: torch.Tensor
    positions: torch.Tensor
    per_layer: torch.Tensor | None = None


@dataclass
class _Step:
    """What the attention function needs during one forward pass."""

    cache: KVCache
    session_ids: list[SessionId]
    q_lens: list[int]
    kv_len: int
    producers: dict[int, int]


def _lpipes_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, Q, D]
    key: torch.Tensor,  # [B, Hkv, Q, D] new tokens only, RoPE'd and normed
    value: torch.Tensor,  # [B, Hkv, Q, Dv]
    attention_mask: torch.Tensor | None,  # [B, 1, Q, K] bool, built by the executor
    *,
    lpipes_step: _Step | None = None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if lpipes_step is None or attention_mask is None:
        raise RuntimeError("the lpipes_ref attention function only runs inside the lpipes executor")
    step = lpipes_step
    layer_idx = module.layer_idx
    source = step.producers.get(layer_idx)
    if source is None:
        step.cache.append(step.session_ids, layer_idx, key, value, step.q_lens)
        source = layer_idx
    keys, values = step.cache.gather(step.session_ids, source, step.kv_len)
    return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=0.0, scaling=scaling)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _lpipes_attention)


class ReferenceExecutor:
    """Runs decoder layers ``[start, end)`` of a checkpoint for batches of sessions.

    Args:
        ckpt: an opened checkpoint (only this span's tensors are read).
        start, end: absolute layer indices of the span.
        dtype: compute and weight dtype (float32, float16, bfloat16).
        cache: KV storage; defaults to a paged cache of ``kv_cache_bytes`` in the executor's dtype.
        kv_cache_bytes: budget of the default paged cache (memory is committed only as blocks fill).
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        *,
        dtype: str | torch.dtype = torch.float32,
        device: str = "cpu",
        cache: KVCache | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
    ) -> None:
        if device != "cpu":
            raise ValueError(f"device {device!r} is not supported yet; use 'cpu'")
        check_span(ckpt.text_config, start, end)
        _register_attention()
        self.start, self.end = start, end
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.config = copy.copy(ckpt.text_config)
        self.config._attn_implementation = ATTN_IMPLEMENTATION
        if getattr(self.config, "num_experts", None):
            self.config._experts_implementation = "eager"
        self.arch = ckpt.arch
        self.hidden_size = int(self.config.hidden_size)
        self.context_length = ckpt.context_length
        self.layers = load_decoder_layers(ckpt, start, end, dtype=self.dtype, config=self.config)
        self.rotary = self.arch.rotary_cls(config=self.config)
        self.layer_types = layer_types(self.config)[start:end]
        self.windows = [attention_window(self.config, i) for i in range(start, end)]
        self.producers = {c: p for c, p in kv_producers(self.config).items() if start <= c < end}
        self._rope_per_sequence = rope_couples_sequences(self.arch, self.config)
        if cache is None:
            cache = PagedKVCache.from_budget(
                layer_shapes_of(self.layers), kv_cache_bytes, self.dtype, first_layer=start
            )
        self.cache: KVCache = cache
        self.ple_size = (
            int(getattr(self.config, "hidden_size_per_layer_input", 0) or 0)
            if self.arch.per_layer_inputs
            else 0
        )

    # ------------------------------------------------------------------ sessions
    def session_length(self, session_id: SessionId) -> int:
        return self.cache.length(session_id)

    def end_session(self, session_id: SessionId) -> None:
        """Free a session's KV cache (unknown sessions raise :class:`~lpipes.errors.SessionError`)."""
        self.cache.end(session_id)

    # ------------------------------------------------------------------- forward
    def _check(self, inputs: Sequence[SequenceInput]) -> None:
        check_inputs(
            inputs,
            hidden_size=self.hidden_size,
            span=(self.start, self.end),
            ple_size=self.ple_size,
            cache=self.cache,
            context_length=self.context_length,
        )

    def _masks(
        self, past: list[int], q_lens: list[int], q_pad: int, kv_len: int
    ) -> dict[int | None, torch.Tensor]:
        """Boolean masks [B, 1, Q, K] (True = attend), one per distinct window size in the span."""
        b = len(q_lens)
        past_t = torch.tensor(past).view(b, 1, 1)
        q_t = torch.tensor(q_lens).view(b, 1, 1)
        row = torch.arange(q_pad).view(1, q_pad, 1)
        col = torch.arange(kv_len).view(1, 1, kv_len)
        q_abs = past_t + row - (q_pad - q_t)  # absolute cache index of each query row
        real_row = row >= (q_pad - q_t)
        base = (col <= q_abs) & (col < past_t + q_t)
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(self.windows):
            allowed = base if window is None else base & (col > q_abs - window)
            # Padding rows attend to key 0 only: their output is discarded, this just avoids NaNs.
            allowed = torch.where(real_row, allowed, col == 0)
            masks[window] = allowed.unsqueeze(1)
        return masks

    def _rotary(
        self, h: torch.Tensor, pos: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def call(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.arch.rotary_per_layer_type:
                return self.rotary(x, p, layer_type)
            return self.rotary(x, p)

        if not self._rope_per_sequence or h.shape[0] == 1:
            return call(h, pos)
        parts = [call(h[b : b + 1], pos[b : b + 1]) for b in range(h.shape[0])]
        return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])

    @torch.inference_mode()
    def forward(self, inputs: Sequence[SequenceInput]) -> list[torch.Tensor]:
        """Run the span for a batch of sessions; returns each one's [T, hidden_size] output."""
        self._check(inputs)
        sids = [x.session_id for x in inputs]
        q_lens = [x.hidden.shape[0] for x in inputs]
        past = [self.cache.length(s) for s in sids]
        b, q_pad = len(inputs), max(q_lens)
        kv_len = max(p + q for p, q in zip(past, q_lens))
        h = torch.zeros((b, q_pad, self.hidden_size), dtype=self.dtype)
        pos = torch.zeros((b, q_pad), dtype=torch.int64)
        ple = None
        if self.ple_size:
            ple = torch.zeros((b, q_pad, self.end - self.start, self.ple_size), dtype=self.dtype)
        for i, x in enumerate(inputs):
            t = q_lens[i]
            h[i, q_pad - t :] = x.hidden
            pos[i, q_pad - t :] = x.positions
            if ple is not None and x.per_layer is not None:
                ple[i, q_pad - t :] = x.per_layer
        masks = self._masks(past, q_lens, q_pad, kv_len)
        rope = {lt: self._rotary(h, pos, lt) for lt in set(self.layer_types)}
        step = _Step(self.cache, sids, q_lens, kv_len, self.producers)
        shared_kv: dict[str, Any] = {}
        try:
            for j, layer in enumerate(self.layers):
                kwargs: dict[str, Any] = {}
                if self.arch.per_layer_inputs:
                    kwargs["per_layer_input"] = ple[:, :, j] if ple is not None else None
                    kwargs["shared_kv_states"] = shared_kv
                else:
                    kwargs["use_cache"] = False
                h = layer(
                    h,
                    attention_mask=masks[self.windows[j]],
                    position_ids=pos,
                    past_key_values=None,
                    position_embeddings=rope[self.layer_types[j]],
                    lpipes_step=step,
                    **kwargs,
                )
        except BaseException:
            self.cache.rollback(sids)
            raise
        self.cache.commit(sids, q_lens)
        return [h[i, q_pad - q_lens[i] :].clone() for i in range(b)]


def check_inputs(
    inputs: Sequence[SequenceInput],
    *,
    hidden_size: int,
    span: tuple[int, int],
    ple_size: int,
    cache: KVCache,
    context_length: int,
) -> None:
    """Validate one executor call's inputs (shapes, dtypes, duplicates, context length) before any work."""
    if not inputs:
        raise ValueError("forward() needs at least one sequence")
    seen = set()
    for x in inputs:
        who = f"session {x.session_id!r}"
        if x.session_id in seen:
            raise ValueError(f"session {x.session_id!r} appears twice in one batch")
        seen.add(x.session_id)
        if x.hidden.ndim != 2 or x.hidden.shape[1] != hidden_size or x.hidden.shape[0] < 1:
            raise ValueError(
                f"{who}: hidden states must be [T>=1, {hidden_size}], got {list(x.hidden.shape)}"
            )
        if not x.hidden.is_floating_point():
            raise ValueError(f"{who}: hidden states must be floating point, got {x.hidden.dtype}")
        t = x.hidden.shape[0]
        if x.positions.shape != (t,) or x.positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{who}: positions must be an int64 tensor of shape [{t}], "
                f"got {x.positions.dtype} {list(x.positions.shape)}"
            )
        if ple_size:
            want = (t, span[1] - span[0], ple_size)
            if x.per_layer is None or tuple(x.per_layer.shape) != want:
                got = None if x.per_layer is None else list(x.per_layer.shape)
                raise ValueError(f"{who}: per-layer inputs must be {list(want)}, got {got}")
        cached = cache.length(x.session_id)
        if int(x.positions[0]) != cached:
            # A step lost, repeated or out of order (e.g. a replay that overtook its session's end):
            # running it would attend to the wrong context and give wrong tokens, not an error.
            raise SessionError(
                f"{who} holds {cached} tokens here, but its step starts at position {int(x.positions[0])}"
            )
        total = cached + t
        if context_length and total > context_length:
            raise ContextLengthError(
                f"session {x.session_id!r} would hold {total} tokens, more than the model's "
                f"context length of {context_length}",
                prompt_tokens=total,
                max_new_tokens=0,
                context_length=context_length,
            )


def split_points_to_spans(num_layers: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """``[2, 4]`` with 6 layers → ``[(0, 2), (2, 4), (4, 6)]``; cuts strictly increasing inside (0, n)."""
    points = [0, *cuts, num_layers]
    if any(a >= b for a, b in zip(points, points[1:])):
        raise LayerSpanError(
            f"split points {list(cuts)} must be strictly increasing and inside (0, {num_layers}) "
            f"for a model with {num_layers} layers"
        )
    return list(zip(points, points[1:]))

"""The native executor: a fused fp16 decoder span for the llama family, run by lpipes._C.

Same contract as :class:`~lpipes.runtime.reference.ReferenceExecutor` (``forward`` /
``end_session`` / ``session_length``), but every layer of the span runs in one native
call per step: fp16 weights streamed once by the SIMD GEMV, fp32 activations and
accumulation, K/V in the paged fp16 cache. Python only computes the RoPE tables with
the architecture's own rotary module (so every RoPE variant is exact; rows that depend
on the position alone are computed once per block of positions and reused) and does
the block bookkeeping.

Supported: llama, mistral, qwen2, qwen3, phi3 and gemma3_text in float16 on CPU.
Anything else uses the reference executor (``executor="auto"`` picks for you).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from lpipes.errors import LpipesError
from lpipes.models.arch import attention_window, check_span, layer_types, rope_couples_sequences
from lpipes.models.checkpoint import Checkpoint
from lpipes.models.modules import load_decoder_layers, parse_dtype
from lpipes.runtime.paged import DEFAULT_KV_CACHE_BYTES, PagedKVCache
from lpipes.runtime.reference import SequenceInput, check_inputs
from lpipes.runtime.weights import WeightArena

log = logging.getLogger(__name__)

# RoPE tables are computed once per block of positions and reused (see NativeExecutor._cached_rope):
# at most ROPE_CACHE_MAX positions (cos + sin: 16 MiB per layer type at head_dim 128).
ROPE_CACHE_BLOCK = 1024
ROPE_CACHE_MAX = 16384

NATIVE_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"})


class NativeUnsupportedError(LpipesError, ValueError):
    """The native executor cannot run this architecture, dtype or device."""


def native_support(ckpt: Checkpoint, dtype: str | torch.dtype, device: str = "cpu") -> str | None:
    """None if the native executor can run this checkpoint; otherwise the reason it cannot."""
    if device != "cpu":
        return f"device {device!r} (the native executor runs on CPU)"
    if parse_dtype(dtype) != torch.float16:
        return f"dtype {parse_dtype(dtype)} (the native executor runs float16)"
    if ckpt.model_type not in NATIVE_ARCHS:
        return f"architecture {ckpt.model_type!r} (native: {', '.join(sorted(NATIVE_ARCHS))})"
    cfg = ckpt.text_config
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    if act not in ("silu", "gelu_pytorch_tanh"):
        return f"activation {act!r}"
    if getattr(cfg, "attn_logit_softcapping", None) and ckpt.model_type != "gemma3_text":
        return "attention logit softcapping"
    return None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _qkv_parts(attn: torch.nn.Module, attr: str) -> list[torch.Tensor]:
    """The q|k|v projection's ``attr`` ("weight" or "bias") as parts to stack by rows."""
    if hasattr(attn, "qkv_proj"):
        return [getattr(attn.qkv_proj, attr)]
    return [getattr(getattr(attn, name), attr) for name in ("q_proj", "k_proj", "v_proj")]


def _matrices(layer: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The layer's weight matrices as the native span wants them: name -> parts to stack by rows."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _qkv_parts(attn, "weight")
    if hasattr(mlp, "gate_up_proj"):
        gate_up = [mlp.gate_up_proj.weight]
    else:
        gate_up = [mlp.gate_proj.weight, mlp.up_proj.weight]
    return {"qkv": qkv, "o": [attn.o_proj.weight], "gate_up": gate_up, "down": [mlp.down_proj.weight]}


class NativeExecutor:
    """Runs decoder layers ``[start, end)`` natively for batches of sessions (fp16 weights and KV).

    Args:
        ckpt: an opened checkpoint (only this span's tensors are read).
        start, end: absolute layer indices of the span.
        kv_cache_bytes: byte budget of the paged KV pool.
        block_size: tokens per KV block.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        *,
        dtype: str | torch.dtype = torch.float16,
        device: str = "cpu",
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        block_size: int = 16,
    ) -> None:
        from lpipes import _C

        reason = native_support(ckpt, dtype, device)
        if reason is not None:
            raise NativeUnsupportedError(
                f"the native executor does not support {reason}; use the reference executor"
            )
        check_span(ckpt.text_config, start, end)
        self.start, self.end = start, end
        self.dtype = torch.float16
        self.arch = ckpt.arch
        self.config = cfg = copy.copy(ckpt.text_config)
        self.hidden_size = int(cfg.hidden_size)
        self.context_length = ckpt.context_length
        self.ple_size = 0
        gemma = ckpt.model_type == "gemma3_text"
        layers: list[Any] = list(load_decoder_layers(ckpt, start, end, dtype=torch.float16, config=cfg))
        head_dim = int(layers[0].self_attn.head_dim)
        num_heads = int(cfg.num_attention_heads)
        num_kv_heads = int(cfg.num_key_value_heads)
        types = layer_types(cfg)
        self._tables = sorted({types[i] for i in range(start, end)})
        self.rotary = self.arch.rotary_cls(config=cfg)
        self._rope_per_sequence = rope_couples_sequences(self.arch, cfg)
        self._rope_cache: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._rope_rows = 0  # positions [0, _rope_rows) are in _rope_cache

        # The fp16 matrices go into one arena on huge pages (lpipes.runtime.weights), fused where
        # the kernels want them fused (q|k|v, gate|up).
        matrices = [_matrices(layer) for layer in layers]
        arena = WeightArena(
            WeightArena.nbytes_for(
                ((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), torch.float16)
                for m in matrices
                for parts in m.values()
            )
        )
        weights = []
        intermediate = None
        for j in range(len(layers)):
            i = start + j
            layer, m = layers[j], matrices[j]
            # Drop the HF layer once its tensors are copied: at most one layer's worth beyond the
            # arena is held while loading.
            layers[j] = matrices[j] = None
            attn = layer.self_attn
            biases = _qkv_parts(attn, "bias")
            bias = None if biases[0] is None else torch.cat(biases)
            w = {name: arena.cat(parts, torch.float16) for name, parts in m.items()}
            intermediate = w["gate_up"].shape[0] // 2
            w |= {
                "qkv_bias": _f32(bias),
                "input_norm": _f32(layer.input_layernorm.weight),
                "post_attn_norm": _f32(layer.post_attention_layernorm.weight),
                "q_norm": _f32(attn.q_norm.weight) if hasattr(attn, "q_norm") else None,
                "k_norm": _f32(attn.k_norm.weight) if hasattr(attn, "k_norm") else None,
                "scale": float(attn.scaling),
                "window": attention_window(cfg, i) or 0,
                "rope_table": self._tables.index(types[i]),
            }
            if gemma:
                w["pre_ff_norm"] = _f32(layer.pre_feedforward_layernorm.weight)
                w["post_ff_norm"] = _f32(layer.post_feedforward_layernorm.weight)
            weights.append(w)
        del layers, matrices, layer, m  # the span keeps only the tensors above
        act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
        native_cfg = {
            "hidden": self.hidden_size,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "intermediate": int(intermediate),
            "eps": float(cfg.rms_norm_eps),
            "norm_offset": self.arch.norm_offset,
            "act": "gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
            "sandwich_norms": gemma,
        }
        self._span = _C.NativeSpan(native_cfg, weights)
        self.cache = PagedKVCache.from_budget(
            [(num_kv_heads, head_dim, head_dim)] * (end - start),
            kv_cache_bytes,
            dtype="float16",
            block_size=block_size,
            first_layer=start,
        )
        self.weight_bytes = sum(
            t.numel() * t.element_size() for w in weights for t in w.values() if torch.is_tensor(t)
        )

    # ------------------------------------------------------------------ sessions
    def session_length(self, session_id: str) -> int:
        return self.cache.length(session_id)

    def end_session(self, session_id: str) -> None:
        """Free a session's KV blocks (unknown sessions raise :class:`~lpipes.errors.SessionError`)."""
        self.cache.end(session_id)

    # ------------------------------------------------------------------- forward
    def _rope_tables(
        self, positions: torch.Tensor, lens: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if not self._rope_per_sequence:
            cached = self._cached_rope(positions)
            if cached is not None:
                return cached
        return self._computed_rope(positions, lens)

    def _computed_rope(
        self, positions: torch.Tensor, lens: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tables from the architecture's own rotary module, for exactly these positions."""
        dummy = torch.empty((1, 1, 1), dtype=torch.float32)
        cos, sin = [], []
        for layer_type in self._tables:

            def call(p: torch.Tensor, lt: str = layer_type) -> tuple[torch.Tensor, torch.Tensor]:
                args = (dummy, p[None]) + ((lt,) if self.arch.rotary_per_layer_type else ())
                c, s = self.rotary(*args)
                return c[0], s[0]

            if self._rope_per_sequence and len(lens) > 1:
                parts = [call(p) for p in positions.split(lens)]
                c, s = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            else:
                c, s = call(positions)
            cos.append(c.float().contiguous())
            sin.append(s.float().contiguous())
        return cos, sin

    def _cached_rope(self, positions: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Rows of tables computed once for positions [0, n) (n grows by ``ROPE_CACHE_BLOCK`` up to
        ``ROPE_CACHE_MAX``), or None for a position outside them. Only for RoPE whose row for a
        position does not depend on the other positions of the call: then a row computed in a
        batch of n positions is bit-identical to the same position computed alone (a K=1 product,
        then elementwise cos/sin), and a decode step skips ~15 small torch calls."""
        if positions.numel() <= 64:
            values = positions.tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo < 0 or hi >= ROPE_CACHE_MAX:
            return None
        if hi >= self._rope_rows:
            n = min(ROPE_CACHE_MAX, -(-(hi + 1) // ROPE_CACHE_BLOCK) * ROPE_CACHE_BLOCK)
            self._rope_cache = self._computed_rope(torch.arange(n), [n])
            self._rope_rows = n
        cos, sin = self._rope_cache
        return [c.index_select(0, positions) for c in cos], [s.index_select(0, positions) for s in sin]

    @torch.inference_mode()
    def forward(self, inputs: Sequence[SequenceInput]) -> list[torch.Tensor]:
        """Run the span for a batch of sessions; returns each one's [T, hidden_size] output (input dtype)."""
        check_inputs(
            inputs,
            hidden_size=self.hidden_size,
            span=(self.start, self.end),
            ple_size=0,
            cache=self.cache,
            context_length=self.context_length,
        )
        sids = [x.session_id for x in inputs]
        lens = [x.hidden.shape[0] for x in inputs]
        starts = [self.cache.length(s) for s in sids]
        self.cache.reserve(sids, lens)
        try:
            if len(inputs) == 1:  # a decode step's usual case: one copy, no concatenations
                x = inputs[0]
                h = x.hidden.to(torch.float32, copy=True).contiguous()
                positions = x.positions.to(torch.int64)
            else:
                h = torch.cat([x.hidden for x in inputs]).to(torch.float32).contiguous()
                positions = torch.cat([x.positions for x in inputs]).to(torch.int64)
            cos, sin = self._rope_tables(positions, lens)
            keys = [self.cache.native_id(s) for s in sids]
            self._span.forward(self.cache.native, h, keys, starts, lens, cos, sin)
        except BaseException:
            self.cache.rollback(sids)
            raise
        self.cache.commit(sids, lens)
        if len(inputs) == 1:
            return [h.to(inputs[0].hidden.dtype)]
        return [part.to(x.hidden.dtype) for part, x in zip(h.split(lens), inputs)]

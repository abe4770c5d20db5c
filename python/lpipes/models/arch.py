"""Architecture adapters: what differs between the decoder-only families lpipes runs.

An :class:`ArchSpec` names transformers' own module classes for one ``model_type``
(decoder layer, rotary embedding, RMSNorm, embedding) and answers the per-layer
questions an executor needs: attention window, layer type, rotary call convention,
KV-sharing producers (Gemma 4). The layer math itself is always transformers' code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from lpipes.errors import LayerSpanError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    decoder_layer: str
    rotary: str
    norm: str
    scaled_embedding: str | None = None  # Gemma: embedding × sqrt(hidden)
    rotary_per_layer_type: bool = False  # rotary(x, pos, layer_type) (gemma3/gemma4)
    per_layer_inputs: bool = False  # Gemma 4 per-layer embeddings (PLE)
    fused_experts: bool = False  # Qwen3-MoE: per-expert tensors on disk, fused 3D params in memory
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): 1 for Gemma 3's (1 + w) norms

    def _cls(self, name: str) -> Any:
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(mod, name)

    @property
    def decoder_layer_cls(self) -> Any:
        return self._cls(self.decoder_layer)

    @property
    def rotary_cls(self) -> Any:
        return self._cls(self.rotary)

    @property
    def norm_cls(self) -> Any:
        return self._cls(self.norm)

    @property
    def scaled_embedding_cls(self) -> Any | None:
        return self._cls(self.scaled_embedding) if self.scaled_embedding else None


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding", "LlamaRMSNorm"),
        ArchSpec("mistral", "mistral", "MistralDecoderLayer", "MistralRotaryEmbedding", "MistralRMSNorm"),
        ArchSpec("qwen2", "qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding", "Qwen2RMSNorm"),
        ArchSpec("qwen3", "qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding", "Qwen3RMSNorm"),
        ArchSpec(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeDecoderLayer",
            "Qwen3MoeRotaryEmbedding",
            "Qwen3MoeRMSNorm",
            fused_experts=True,
        ),
        ArchSpec("phi3", "phi3", "Phi3DecoderLayer", "Phi3RotaryEmbedding", "Phi3RMSNorm"),
        ArchSpec(
            "gemma3_text",
            "gemma3",
            "Gemma3DecoderLayer",
            "Gemma3RotaryEmbedding",
            "Gemma3RMSNorm",
            scaled_embedding="Gemma3TextScaledWordEmbedding",
            rotary_per_layer_type=True,
            norm_offset=1.0,
        ),
        ArchSpec(
            "gemma4_text",
            "gemma4",
            "Gemma4TextDecoderLayer",
            "Gemma4TextRotaryEmbedding",
            "Gemma4RMSNorm",
            scaled_embedding="Gemma4TextScaledWordEmbedding",
            rotary_per_layer_type=True,
            per_layer_inputs=True,
        ),
    )
}


def arch_spec(model_type: str) -> ArchSpec:
    """The adapter for ``model_type`` (the text config's), or a clear error."""
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: lpipes runs {', '.join(sorted(ARCHS))}"
        ) from None


def layer_types(config: Any) -> list[str]:
    """Per-layer attention type ("full_attention" / "sliding_attention") for every layer."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        return list(types)
    # mistral, phi3, qwen3_moe have no layer_types: a set sliding_window makes every layer sliding.
    sliding = getattr(config, "sliding_window", None)
    return ["sliding_attention" if sliding else "full_attention"] * n


def attention_window(config: Any, layer_idx: int) -> int | None:
    """Sliding-window size W of a layer (W tokens including the query itself), or None for full attention."""
    if layer_types(config)[layer_idx] == "sliding_attention":
        window = getattr(config, "sliding_window", None)
        return int(window) if window else None
    return None


def rope_couples_sequences(spec: ArchSpec, config: Any) -> bool:
    """True when RoPE tables depend on the whole call, not just each position: ``longrope`` picks its
    factors from the largest position in the call and ``dynamic`` rescales with it. Batched sessions
    must then get their tables computed one sequence at a time."""
    rope = getattr(config, "rope_parameters", None) or {}
    kinds = (
        {v.get("rope_type") for v in rope.values()} if spec.rotary_per_layer_type else {rope.get("rope_type")}
    )
    return bool(kinds & {"longrope", "dynamic"})


def kv_producers(config: Any) -> dict[int, int]:
    """Gemma 4 KV sharing: consumer layer index → the earlier layer whose K/V it reuses.

    Empty for architectures without KV sharing.
    """
    modes = getattr(config, "kv_sharing_modes", None)
    if not modes:
        return {}
    types = layer_types(config)
    last_store: dict[str, int] = {}
    producers: dict[int, int] = {}
    for i, mode in enumerate(modes):
        if mode == "store":
            last_store[types[i]] = i
        elif mode == "reuse":
            if types[i] not in last_store:
                raise UnsupportedArchitectureError(
                    f"layer {i} reuses the K/V of an earlier {types[i]} layer, "
                    "but no earlier layer stores one"
                )
            producers[i] = last_store[types[i]]
    return producers


def check_span(config: Any, start: int, end: int) -> None:
    """Raise :class:`LayerSpanError` unless ``[start, end)`` is a runnable span of this model."""
    n = config.num_hidden_layers
    if not (isinstance(start, int) and isinstance(end, int)):
        raise LayerSpanError(f"layer span must be two integers, got [{start!r}, {end!r})")
    if not 0 <= start < end <= n:
        raise LayerSpanError(
            f"layer span [{start}, {end}) is out of range: the model has {n} layers, "
            f"so a span must satisfy 0 <= start < end <= {n}"
        )
    for consumer, producer in kv_producers(config).items():
        if start <= consumer < end and not start <= producer < end:
            raise LayerSpanError(
                f"layer span [{start}, {end}) holds layer {consumer}, which reuses the K/V cache of layer "
                f"{producer} (Gemma 4 KV sharing), but not layer {producer}; cross-span KV sharing is not "
                f"supported yet, so start the span at or before layer {producer}"
            )


def valid_cut_points(config: Any) -> list[int]:
    """Layer indices at which the model may be cut between two spans (1..n-1)."""
    producers = kv_producers(config)
    return [
        cut
        for cut in range(1, config.num_hidden_layers)
        if not any(p < cut <= c for c, p in producers.items())
    ]

"""The end model: everything of a language model that touches text.

The origin node holds it: the tokenizer and chat template, the token embedding
(Gemma's scaled embedding included), Gemma 4's per-layer inputs, the final norm, the
LM head (tied to the embedding or not) and the final-logit softcap. Layer peers
never see any of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lpipes.errors import CheckpointError
from lpipes.models.checkpoint import Checkpoint
from lpipes.models.modules import parse_dtype
from lpipes.runtime.weights import WeightArena

log = logging.getLogger(__name__)


def _meta_then_assign(factory: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        module = factory()
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(dtype).eval().requires_grad_(False)


class EndModel:
    """Tokenizer, embedding, final norm, LM head and softcap of one checkpoint.

    Args:
        ckpt: an opened checkpoint; only the end-model tensors are read.
        dtype: weight and compute dtype; :meth:`logits` always returns float32.
        tokenizer: an already loaded tokenizer (default: loaded from the checkpoint directory).
        native_head: compute the final norm and LM head with lpipes' fp32-accumulating fp16 kernels
            (float16 only) instead of torch.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        *,
        dtype: str | torch.dtype = torch.float32,
        device: str = "cpu",
        tokenizer: Any | None = None,
        native_head: bool = False,
    ) -> None:
        if device != "cpu":
            raise ValueError(f"device {device!r} is not supported yet; use 'cpu'")
        self.config = cfg = ckpt.text_config
        self.arch = ckpt.arch
        self.dtype = parse_dtype(dtype)
        self.context_length = ckpt.context_length
        self.num_layers = ckpt.num_layers
        names = ckpt.end_tensor_names()
        t = ckpt.load_tensors(names.values())
        hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
        self.vocab_size = vocab
        emb_w = t[names["embed_tokens"]]
        if tuple(emb_w.shape) != (vocab, hidden):
            raise CheckpointError(f"embedding is {list(emb_w.shape)}, config says [{vocab}, {hidden}]")
        pad = getattr(cfg, "pad_token_id", None)

        def embedding(num: int, dim: int, scale: float) -> nn.Module:
            if self.arch.scaled_embedding_cls is not None:
                return self.arch.scaled_embedding_cls(num, dim, pad, embed_scale=scale)
            return nn.Embedding(num, dim, pad)

        self.embed_tokens = _meta_then_assign(
            lambda: embedding(vocab, hidden, hidden**0.5), {"weight": emb_w}, self.dtype
        )
        self._fix_embed_scale(self.embed_tokens, hidden**0.5)
        eps = float(cfg.rms_norm_eps)
        self.norm = _meta_then_assign(
            lambda: self.arch.norm_cls(hidden, eps=eps), {"weight": t[names["norm"]]}, self.dtype
        )
        head_w = t[names["lm_head"]] if "lm_head" in names else emb_w
        self.lm_head = _meta_then_assign(
            lambda: nn.Linear(hidden, vocab, bias=False), {"weight": head_w}, self.dtype
        )
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self._native_head = None
        if native_head:
            if self.dtype != torch.float16:
                raise ValueError(f"native_head needs float16 weights, not {self.dtype}")
            norm_w = self.norm.weight.float().contiguous()
            # On huge pages, like the native spans' weights (lpipes.runtime.weights); a tied
            # embedding reads its rows from the same copy.
            head = self.lm_head.weight
            arena = WeightArena(WeightArena.nbytes_for([(head.shape, torch.float16)]))
            fast = arena.copy(head, torch.float16)
            if head.data_ptr() == self.embed_tokens.weight.data_ptr():
                self.embed_tokens.weight = nn.Parameter(fast, requires_grad=False)
            self.lm_head.weight = nn.Parameter(fast, requires_grad=False)
            self._native_head = (norm_w, eps, self.arch.norm_offset, fast)

        self.ple_size = 0
        if "embed_tokens_per_layer" in names:
            p = self.ple_size = int(cfg.hidden_size_per_layer_input)
            n = self.num_layers
            self.embed_tokens_per_layer = _meta_then_assign(
                lambda: embedding(int(cfg.vocab_size_per_layer_input), n * p, p**0.5),
                {"weight": t[names["embed_tokens_per_layer"]]},
                self.dtype,
            )
            self._fix_embed_scale(self.embed_tokens_per_layer, p**0.5)
            self.per_layer_model_projection = _meta_then_assign(
                lambda: nn.Linear(hidden, n * p, bias=False),
                {"weight": t[names["per_layer_model_projection"]]},
                self.dtype,
            )
            self.per_layer_projection_norm = _meta_then_assign(
                lambda: self.arch.norm_cls(p, eps=eps),
                {"weight": t[names["per_layer_projection_norm"]]},
                self.dtype,
            )

        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(ckpt)
        self.eos_token_ids = self._eos_ids(ckpt)

    @staticmethod
    def _fix_embed_scale(module: nn.Module, scale: float) -> None:
        # Gemma's scale is a non-persistent buffer: not in the checkpoint, left on meta by assign.
        if hasattr(module, "embed_scale"):
            module.embed_scale = torch.tensor(scale)

    @staticmethod
    def _load_tokenizer(ckpt: Checkpoint) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(ckpt.path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path}: cannot load the tokenizer: {exc}") from exc

    def _eos_ids(self, ckpt: Checkpoint) -> set[int]:
        ids: set[int] = set()

        def add(value: Any) -> None:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)

        gen_file = ckpt.path / "generation_config.json"
        if gen_file.is_file():
            from transformers import GenerationConfig

            add(GenerationConfig.from_pretrained(str(ckpt.path)).eos_token_id)
        else:
            add(getattr(self.config, "eos_token_id", None))
        add(getattr(self.tokenizer, "eos_token_id", None))
        return ids

    # ----------------------------------------------------------------- text side
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (the tokenizer's own special-token rules apply)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a conversation (and tool schemas, if any) rendered with the chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise CheckpointError("this model's tokenizer has no chat template; send a plain prompt instead")
        ids = self.tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
        return [int(i) for i in ids]

    # --------------------------------------------------------------- tensor side
    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids → [T, hidden] input hidden states."""
        return self.embed_tokens(ids)

    @torch.inference_mode()
    def per_layer_inputs(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor | None:
        """Gemma 4 per-layer inputs [T, num_layers, P] for ``ids`` [T] and embeddings [T, H]; else None."""
        if not self.ple_size:
            return None
        n, p = self.num_layers, self.ple_size
        token_part = self.embed_tokens_per_layer(ids).reshape(*ids.shape, n, p)
        proj = self.per_layer_model_projection(embeds) * (int(self.config.hidden_size) ** -0.5)
        proj = self.per_layer_projection_norm(proj.reshape(*embeds.shape[:-1], n, p))
        return (proj + token_part) * (2.0**-0.5)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] final hidden states → [N, vocab] float32 logits (final norm, head, softcap)."""
        if self._native_head is not None:
            from lpipes import _C

            norm_w, eps, offset, head_w = self._native_head
            x = hidden.float().contiguous()
            normed = torch.empty_like(x)
            _C.rms_norm(x, norm_w, eps, offset, normed)
            out = torch.empty((x.shape[0], head_w.shape[0]), dtype=torch.float32)
            _C.linear_f16(normed, head_w, out)
        else:
            out = self.lm_head(self.norm(hidden.to(self.dtype))).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

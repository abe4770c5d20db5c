"""Seeded tiny random-weight checkpoints and an offline byte-level BPE tokenizer.

Used by the test suite, ``lpipes generate --demo`` and the benchmarks. Nothing here
touches the network: configs come from transformers' own config classes, weights are
drawn from a seeded generator, and the tokenizer is trained on a built-in corpus.
A checkpoint directory is a normal Hugging Face directory (``config.json``,
``model*.safetensors`` with an index when sharded, ``tokenizer.json``,
``chat_template.jinja``) that ``transformers`` can load with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# ChatML, as used by Qwen-style instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 512
MODEL_VOCAB_SIZE = 512  # equal to the tokenizer vocabulary, so every sampled id decodes

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "lpipes spreads the layers of a language model over several machines.",
    "Each peer holds a span of transformer layers and passes hidden states along.",
    "Hello world! How are you today? I am fine, thank you.",
    "Distributed inference lets ordinary computers run models none of them can hold alone.",
    "The origin keeps the tokenizer, the embedding, the final norm and the language-model head.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828",
    "Grüße aus Köln — naïve café, déjà vu, smörgåsbord.",
    "東京は日本の首都です。大阪、京都、名古屋。",
    "Emoji are multi-byte too: 🚀 🌍 🤖 🎉 ✨",
    "Привет, мир! Как дела?",
    "def main():\n    print('hello')\n    return 0\n",
    "system user assistant tool: you are a helpful assistant.",
]


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Any:
    """Train a byte-level BPE tokenizer offline and wrap it for transformers.

    Returns a ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template,
    ``eos_token="<|im_end|>"``, ``pad_token="<|endoftext|>"`` and left padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _layer_types(pattern: list[str], n: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(n)]


def tiny_config(arch: str, *, num_layers: int = 6, vocab_size: int = MODEL_VOCAB_SIZE) -> Any:
    """A transformers config of the given architecture at toy size.

    Every architecture's distinguishing feature is switched on: llama3 rope scaling,
    sliding windows (mistral, qwen2, gemma), qkv bias (qwen2), q/k norms (qwen3, gemma),
    sparse experts with a dense layer (qwen3_moe), partial rotary (phi3), final-logit
    softcapping (gemma3), per-layer embeddings, KV sharing and K=V (gemma4).
    """
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.08,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(
            **{**common, "tie_word_embeddings": True},
            head_dim=16,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=5)
    if arch == "qwen2":
        return tf.Qwen2Config(
            **{**common, "tie_word_embeddings": True},
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=3,
        )
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    if arch == "phi3":
        return tf.Phi3Config(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        )
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=5,
            layer_types=_layer_types(
                ["sliding_attention", "sliding_attention", "full_attention"], num_layers
            ),
            final_logit_softcapping=30.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        )
    if arch == "gemma4_text":
        return tf.Gemma4TextConfig(
            **{**common, "tie_word_embeddings": True},
            head_dim=16,
            global_head_dim=32,
            sliding_window=5,
            layer_types=_layer_types(["sliding_attention", "full_attention"], num_layers),
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=vocab_size,
            num_kv_shared_layers=2,
            attention_k_eq_v=True,
            final_logit_softcapping=30.0,
        )
    raise ValueError(f"no tiny config for architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3_text", "gemma4_text")


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    num_layers: int = 6,
    max_shard_size: str | int | None = "120KB",
    dtype: str = "float32",
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a seeded random-weight checkpoint plus tokenizer to ``path`` and return it.

    Norm weights and biases get random offsets too (they initialise to constants), so an
    executor that mishandles a norm variant or a bias cannot pass by accident.
    ``max_shard_size`` small enough yields several safetensors shards with an index.
    """
    import torch
    import transformers as tf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, num_layers=num_layers)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "layer_scalar" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=gen))
    model = model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = config.pad_token_id
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    build_tokenizer().save_pretrained(path)
    (path / "lpipes-tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "num_layers": num_layers}))
    return path

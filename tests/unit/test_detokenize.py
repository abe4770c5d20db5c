"""Unit tests for lpipes.generation.detokenize, on the offline tiny byte-level BPE tokenizer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from lpipes.generation import IncrementalDetokenizer
from lpipes.models.tiny import build_tokenizer

TEXTS = [
    "",
    "Hello world! How are you today?",
    "🚀 東京 Grüße",
    "Grüße aus Köln — naïve café, déjà vu, smörgåsbord.",
    "東京は日本の首都です。大阪、京都、名古屋。",
    "Emoji are multi-byte too: 🚀 🌍 🤖 🎉 ✨",
    "Привет, мир! Как дела?",
    "def main():\n    print('hello')\n    return 0\n",
    "  leading and trailing spaces  ",
    "🤖🤖🤖🎉✨🌍",
    "mixed: abc東xyz🚀ü!",
    "unseen characters: Ω ∑ 𝄞 中文 한국어",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def _stream(tokenizer: Any, ids: Sequence[int], **kwargs: Any) -> list[str]:
    """Push ``ids`` one by one; return every push result followed by the flush result."""
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_never_splits_a_character(tokenizer: Any, text: str) -> None:
    ids = _encode(tokenizer, text)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces), pieces


def test_multibyte_characters_are_split_by_this_tokenizer(tokenizer: Any) -> None:
    # Guards the tests above: they only mean something if some token ends mid-character.
    ids = _encode(tokenizer, "🚀 東京 Grüße")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_held_back_text_is_released_when_complete(tokenizer: Any) -> None:
    ids = _encode(tokenizer, "🚀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🚀"
    assert detok.flush() == ""


def test_flush_emits_incomplete_bytes_as_replacement(tokenizer: Any) -> None:
    ids = _encode(tokenizer, "a🚀")
    first_half = ids[:-1]
    pieces = _stream(tokenizer, first_half)
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces) == tokenizer.decode(first_half)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: Any, skip_special_tokens: bool) -> None:
    text = "<|im_start|>assistant\nGrüße 🚀<|im_end|>\n<|endoftext|>東京<|im_end|>"
    ids = _encode(tokenizer, text)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    pieces = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in "".join(pieces)) is not skip_special_tokens


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_streams_match_full_decode(tokenizer: Any, skip_special_tokens: bool) -> None:
    # Random ids produce invalid UTF-8 in the middle of the text too; it must come out
    # exactly as a full decode renders it.
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(100):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        pieces = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


@pytest.mark.parametrize("text", TEXTS[1:])
def test_prompt_is_context_only(tokenizer: Any, text: str) -> None:
    prompt = _encode(tokenizer, "<|im_start|>user\nSay something 東京<|im_end|>\n<|im_start|>assistant\n")
    ids = _encode(tokenizer, text)
    pieces = _stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(pieces) == text


def test_push_after_flush_continues(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    first, second = _encode(tokenizer, "Grüße "), _encode(tokenizer, "🚀 aus Köln")
    out = "".join(detok.push(i) for i in first) + detok.flush()
    out += "".join(detok.push(i) for i in second) + detok.flush()
    assert out == "Grüße 🚀 aus Köln"


class _CountingTokenizer:
    """Wraps a tokenizer and records the length of every id list it decodes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_per_token_is_bounded_by_the_window(tokenizer: Any) -> None:
    ids = _encode(tokenizer, " ".join(TEXTS) * 5)
    assert len(ids) > 1000
    cut = next(k for k in range(500, len(ids)) if not tokenizer.decode(ids[:k]).endswith("\ufffd"))
    counting = _CountingTokenizer(tokenizer)
    pieces = _stream(counting, ids[cut:], prompt_ids=ids[:cut])  # type: ignore[arg-type]
    assert "".join(pieces) == tokenizer.decode(ids[cut:])
    assert max(counting.lengths) <= 10

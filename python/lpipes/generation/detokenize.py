"""Incremental detokenization of a token stream.

Decoding each token on its own is wrong in two ways: byte-level BPE tokens can end in
the middle of a UTF-8 character (decoding them alone gives U+FFFD), and some
tokenizers add or strip spaces depending on what precedes a token. Decoding everything
generated so far after every token is correct but costs O(total) per token.

:class:`IncrementalDetokenizer` uses the sliding-window scheme of vLLM and TGI: it keeps
two offsets into the token list, ``prefix_offset <= read_offset``. The text of
``tokens[prefix_offset:read_offset]`` has already been emitted; after a new token it
decodes ``tokens[prefix_offset:]`` and emits what that adds to the decoded prefix. The
prefix gives the tokenizer context for spacing, and the window only grows while the
text is incomplete, so the cost per token is O(window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# How many prompt tokens give the first generated token its context (as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, never splitting a character.

    The concatenation of every :meth:`push` result and the final :meth:`flush` equals
    ``tokenizer.decode(generated_ids, skip_special_tokens=...)`` for byte-level BPE
    tokenizers. When the decoded window ends in U+FFFD (an incomplete UTF-8 sequence),
    the text is held back until a later token completes it; :meth:`flush` emits whatever
    remains, replacement characters included.

    Args:
        tokenizer: A transformers tokenizer (``decode(ids, skip_special_tokens=...)``).
        skip_special_tokens: Drop special tokens from the text, as ``decode`` does.
        prompt_ids: The prompt's token ids; its last few tokens are decoding context for
            the first generated tokens (for tokenizers whose spacing depends on the
            previous token). Their text is never emitted. The prompt must end on a
            character boundary, as the ids of any encoded string do.
    """

    def __init__(
        self, tokenizer: Any, *, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self) -> str:
        """Text that ``tokens[prefix_offset:]`` adds to ``tokens[prefix_offset:read_offset]``."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        return full[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became complete ("" if none)."""
        self._ids.append(int(token_id))
        new_text = self._new_text()
        if not new_text or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text

    def flush(self) -> str:
        """Return the text still held back (possibly with U+FFFD) and reset the window."""
        new_text = self._new_text()
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text


__all__ = ["IncrementalDetokenizer"]

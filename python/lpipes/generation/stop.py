"""Stop strings over streamed text.

Generated text arrives in deltas, and a stop string may be split across several of
them. :class:`StopStringMatcher` emits text as early as it can while guaranteeing that
no part of a stop string is ever emitted: it holds back the longest tail of the
pending text that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Cuts a text stream at the first stop string to appear in it.

    Feed every text delta to :meth:`push` and emit what it returns; at the end of
    generation (when no stop string matched) emit :meth:`flush` too. Once a stop string
    is found, everything from its start on, including later pushes, is dropped.

    "First to appear" means the occurrence that ends earliest in the text, as if the
    text arrived one character at a time; among occurrences ending at the same place the
    one starting earliest (the longest) wins. So the result does not depend on how the
    text is split into deltas: with stops ``["abcdef", "cd"]`` the text ``"xabcdef"`` is
    cut to ``"xab"``, because ``"cd"`` is complete before ``"abcdef"`` is.

    Args:
        stops: The stop strings; each must be non-empty. An empty sequence is allowed
            (nothing is ever held back).

    Raises:
        TypeError: ``stops`` is a single string rather than a sequence of strings.
        ValueError: A stop string is empty.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise TypeError(f"stops must be a sequence of strings, not one string; use [{stops!r}]")
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}: {s!r}")
            if not s:
                raise ValueError("stop strings must be non-empty (an empty one would match everywhere)")
        self.stops: tuple[str, ...] = tuple(stops)
        # Every proper prefix of a stop string: a pending tail equal to one must be held back.
        self._prefixes: frozenset[str] = frozenset(s[:i] for s in self.stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._pending = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """True once a stop string has been found."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, or None."""
        return self._matched

    def push(self, text: str) -> tuple[str, bool]:
        """Add a delta of generated text.

        Returns:
            ``(safe, stopped)``: ``safe`` is the text that can be emitted now (it never
            contains any part of a stop string); ``stopped`` is True once a stop string
            has been found, in which case ``safe`` is the text before it and all
            later text is dropped.
        """
        if self._matched is not None:
            return "", True
        buf = self._pending + text
        best: tuple[int, int] | None = None  # (end, start) of the first stop string to complete
        for stop in self.stops:
            at = buf.find(stop)
            if at != -1 and (best is None or (at + len(stop), at) < best):
                best, self._matched = (at + len(stop), at), stop
        if best is not None:
            self._pending = ""
            return buf[: best[1]], True
        hold = next(
            (n for n in range(min(self._max_hold, len(buf)), 0, -1) if buf[-n:] in self._prefixes),
            0,
        )
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Return the held-back text at the end of generation ("" after a stop string matched)."""
        rest, self._pending = self._pending, ""
        return rest


__all__ = ["StopStringMatcher"]

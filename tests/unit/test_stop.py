"""Unit tests for lpipes.generation.stop."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from lpipes.generation import StopStringMatcher


def _run(stops: Sequence[str], chunks: Sequence[str]) -> tuple[list[str], bool]:
    """Push every chunk; return the emitted pieces (flush included when not stopped) and stopped."""
    m = StopStringMatcher(stops)
    out: list[str] = []
    stopped = False
    for chunk in chunks:
        safe, stopped = m.push(chunk)
        out.append(safe)
    if not stopped:
        out.append(m.flush())
    return out, stopped


def _splits(text: str, max_cuts: int) -> list[list[str]]:
    """Every way to cut ``text`` into consecutive non-empty pieces with at most ``max_cuts`` cuts."""
    result = []
    for n in range(min(max_cuts, len(text) - 1) + 1):
        for cuts in itertools.combinations(range(1, len(text)), n):
            bounds = (0, *cuts, len(text))
            result.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return result


def _all_splits(text: str) -> list[list[str]]:
    """Every split of a short ``text`` (2 ** (len - 1) of them); for a long one, every split
    into at most 4 pieces plus one character per piece."""
    if len(text) <= 12:
        return _splits(text, len(text))
    return [*_splits(text, 3), list(text)]


def _expected(stops: Sequence[str], text: str) -> tuple[str, bool]:
    """Reference: reveal ``text`` one character at a time and cut at the first stop string."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[: end - max(map(len, hits))], True
    return text, False


@pytest.mark.parametrize(
    ("stops", "text"),
    [
        (["</s>"], "Hello</s>world"),
        (["</s>"], "no stop here <s and </ but not closed"),
        (["###"], "a##b###c"),
        (["abc"], "ababcab"),
        (["aab"], "aaaab"),
        (["abab"], "abababx"),
        (["xyz", "yz"], "axyzb"),
        (["END", "STOP"], "go STOP then END"),
        (["\n\n", "User:"], "one\ntwo\n\nUser: three"),
        (["é!", "🚀"], "café! 🚀"),
        (["ab", "abc"], "xxabc"),
        (["abcdef", "cd"], "xabcdefg"),
        (["bcd", "abcde"], "zabcdez"),
        (["a"], "a"),
    ],
)
def test_every_split_gives_the_same_result(stops: list[str], text: str) -> None:
    want_text, want_stopped = _expected(stops, text)
    for pieces in _all_splits(text):
        out, stopped = _run(stops, pieces)
        assert "".join(out) == want_text, pieces
        assert stopped == want_stopped, pieces


def test_random_stops_and_splits_match_reference() -> None:
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in itertools.pairwise((0, *cuts, len(text)))]
        out, stopped = _run(stops, pieces)
        assert ("".join(out), stopped) == _expected(stops, text), (stops, pieces)


def test_no_part_of_a_stop_string_is_ever_emitted() -> None:
    stops = ["<|end|>"]
    text = "answer<|end|>ignored"
    for pieces in _all_splits(text):
        m = StopStringMatcher(stops)
        emitted = ""
        for piece in pieces:
            safe, _ = m.push(piece)
            emitted += safe
            assert "<" not in emitted, pieces
        assert emitted == "answer"


def test_text_is_emitted_as_early_as_possible() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("hello S") == ("hello ", False)
    assert m.push("T") == ("", False)
    assert m.push("x") == ("STx", False)
    assert m.push("ST") == ("", False)
    assert m.flush() == "ST"
    assert m.flush() == ""


def test_overlapping_partial_prefixes_hold_the_longest() -> None:
    m = StopStringMatcher(["abcd", "bcx"])
    # "abc" is a prefix of "abcd" and its tail "bc" one of "bcx": hold all three.
    assert m.push("zabc") == ("z", False)
    assert m.push("x") == ("a", True)
    assert m.matched == "bcx"


def test_earliest_start_wins_among_matches_ending_together() -> None:
    m = StopStringMatcher(["yz", "xyz"])
    assert m.push("axyzb") == ("a", True)
    assert m.matched == "xyz"


def test_first_completed_stop_wins() -> None:
    m = StopStringMatcher(["abcdef", "cd"])
    assert m.push("xabc") == ("x", False)
    assert m.push("def") == ("ab", True)
    assert m.matched == "cd"
    assert StopStringMatcher(["abcdef", "cd"]).push("xabcdef") == ("xab", True)


def test_longer_stop_completing_first_wins() -> None:
    m = StopStringMatcher(["long stop", "op!"])
    assert m.push("a long st") == ("a ", False)
    assert m.push("op!") == ("", True)
    assert m.matched == "long stop"


def test_everything_after_a_stop_is_dropped() -> None:
    m = StopStringMatcher(["!"])
    assert m.push("hi! there") == ("hi", True)
    assert m.stopped and m.matched == "!"
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_stop_at_very_start() -> None:
    assert StopStringMatcher(["x"]).push("xyz") == ("", True)


def test_no_stops_passes_everything_through() -> None:
    m = StopStringMatcher([])
    assert m.push("anything") == ("anything", False)
    assert m.flush() == ""
    assert not m.stopped and m.matched is None


def test_empty_pushes_are_harmless() -> None:
    m = StopStringMatcher(["ab"])
    assert m.push("") == ("", False)
    assert m.push("a") == ("", False)
    assert m.push("") == ("", False)
    assert m.push("b") == ("", True)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_single_string_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"use \['###'\]"):
        StopStringMatcher("###")


def test_non_string_stop_is_rejected() -> None:
    with pytest.raises(TypeError, match="must be str"):
        StopStringMatcher(["ok", 3])  # type: ignore[list-item]

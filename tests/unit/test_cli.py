"""The `lpipes` command line: stdout carries only the generated text; errors are clear and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lpipes.generation.sampling import SamplingParams
from lpipes.runtime.local import build_local_generator


def _lpipes(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "lpipes.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_generate_prints_only_the_completion(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    out = _lpipes(
        "generate",
        "--model",
        str(path),
        "--prompt",
        "Hello world",
        "--max-tokens",
        "12",
        "--split",
        "2,4",
        "--ignore-eos",
        "--raw",
        "--dtype",
        "float32",
    )
    assert out.returncode == 0, out.stderr
    gen = build_local_generator(path, split=[2, 4])
    ids = gen.end_model.encode_prompt("Hello world")
    text, tokens, finish = gen.generate_text(ids, SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(tokens) == 12 and finish == "length"
    assert out.stdout == text + "\n"


def test_generate_seeded_sampling_is_reproducible(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    args = [
        "generate",
        "--model",
        path,
        "--prompt",
        "Hi",
        "--max-tokens",
        "10",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "--ignore-eos",
    ]
    first, second = _lpipes(*args), _lpipes(*args, "--split", "3")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "4,2"], "strictly increasing"),
        (["--split", "9"], "strictly increasing"),
    ],
)
def test_generate_bad_split(tiny_checkpoint, args, message):
    out = _lpipes("generate", "--model", str(tiny_checkpoint("qwen3")), "--prompt", "x", *args)
    assert out.returncode == 2
    assert message in out.stderr and out.stdout == ""


def test_generate_missing_model(tmp_path):
    out = _lpipes("generate", "--model", str(tmp_path / "absent"), "--prompt", "x")
    assert out.returncode == 2
    assert "does not exist" in out.stderr


def test_demo_runs(tmp_path):
    out = _lpipes("demo", "--prompt", "hi", "--max-tokens", "5", env_extra={"LPIPES_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "demo-qwen3" / "config.json").is_file()
    assert out.stdout.endswith("\n")


def test_help_lists_commands():
    out = _lpipes("--help")
    assert out.returncode == 0
    assert "generate" in out.stdout and "demo" in out.stdout
    out = _lpipes("generate", "--help")
    assert "--split" in out.stdout and "--ignore-eos" in out.stdout


def test_freeze_startup_objects_collects_startup_garbage_then_freezes_the_rest():
    """Serving nodes freeze their startup heap (a full collection of a loaded node took ~250 ms); the
    garbage of startup is collected first, not frozen with it, and later garbage is still collected."""
    import gc
    import weakref

    from lpipes.cli.main import freeze_startup_objects

    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    kept = Node()
    startup_garbage = cycle()
    assert startup_garbage() is not None
    try:
        freeze_startup_objects()
        assert startup_garbage() is None
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: out of the collector's sight
        later_garbage = cycle()
        gc.collect()
        assert later_garbage() is None
    finally:
        gc.unfreeze()

"""Shared fixtures. No test reaches the network: the hub is forced offline before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(arch, seed=0, **kw)`` → path of a seeded tiny random checkpoint, built once."""
    from lpipes.models.tiny import make_tiny_checkpoint

    built: dict[tuple, Path] = {}

    def get(arch: str, seed: int = 0, **kwargs) -> Path:
        key = (arch, seed, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(f"ckpt-{arch}"), arch, seed=seed, **kwargs
            )
        return built[key]

    return get

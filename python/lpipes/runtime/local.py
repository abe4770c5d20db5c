"""An in-process model of the network: every span is its own executor, built from the checkpoint alone.

``lpipes generate --split`` uses it; it passes hidden states between spans exactly as
peers will, so it is the reference for what a distributed run must produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lpipes.generation.loop import Generator
from lpipes.models.checkpoint import open_checkpoint
from lpipes.models.end_model import EndModel
from lpipes.runtime.reference import ReferenceExecutor, split_points_to_spans


def build_local_generator(
    model: str | Path,
    *,
    split: Sequence[int] = (),
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
) -> Generator:
    """An end model plus one :class:`ReferenceExecutor` per span, each opening the checkpoint on its own.

    Args:
        model: local directory or hub id.
        split: layer indices where the model is cut, e.g. ``[2, 4]`` → spans [0,2), [2,4), [4,n).
        dtype: float32, float16 or bfloat16.
    """
    end_ckpt = open_checkpoint(model, end_model=True, revision=revision)
    spans = split_points_to_spans(end_ckpt.num_layers, list(split))
    for span in spans:  # check every span before loading anything
        open_checkpoint(end_ckpt.path, layers=span, end_model=False)
    end = EndModel(end_ckpt, dtype=dtype)
    stages = [
        ReferenceExecutor(
            open_checkpoint(model, layers=span, end_model=False, revision=revision), *span, dtype=dtype
        )
        for span in spans
    ]
    return Generator(end, stages)

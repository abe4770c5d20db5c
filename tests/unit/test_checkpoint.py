"""Opening checkpoints: slice-only loading, hub cache resolution offline, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lpipes.errors import CheckpointError, ContextLengthError, LayerSpanError, UnsupportedArchitectureError
from lpipes.generation.loop import GenerationRequest, Generator
from lpipes.generation.sampling import SamplingParams
from lpipes.models.checkpoint import INDEX_FILE, open_checkpoint
from lpipes.models.end_model import EndModel
from lpipes.runtime.reference import ReferenceExecutor, SequenceInput, split_points_to_spans


def _files_of_layers(ckpt, start, end):
    return {ckpt.weight_map[n] for i in range(start, end) for n in ckpt.layer_tensor_names(i)}


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "gemma4_text"])
def test_span_loads_only_its_own_shards(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    ckpt = open_checkpoint(path, layers=(2, 4), end_model=False)
    all_files = set(ckpt.weight_map.values())
    assert len(all_files) >= 4, "the tiny checkpoint must be sharded for this test to mean anything"
    ReferenceExecutor(ckpt, 2, 4)
    assert ckpt.opened_files == _files_of_layers(ckpt, 2, 4)
    assert ckpt.opened_files < all_files
    end_files = {ckpt.weight_map[n] for n in ckpt.end_tensor_names().values()}
    assert not (end_files - _files_of_layers(ckpt, 2, 4)) & ckpt.opened_files


def test_end_model_loads_only_end_tensors(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("qwen3"))
    EndModel(ckpt)
    assert ckpt.opened_files == {ckpt.weight_map[n] for n in ckpt.end_tensor_names().values()}


def test_multimodal_prefix(tmp_path, tiny_checkpoint):
    """A text decoder stored under a wrapper prefix (as Gemma 3/4 multimodal checkpoints do) is found."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("qwen3")
    dst = tmp_path / "wrapped"
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_FILE).read_text())
    new_map = {}
    for fname in set(index["weight_map"].values()):
        tensors = load_file(dst / fname)
        renamed = {("language_model." + k if k.startswith("model.") else k): v for k, v in tensors.items()}
        save_file(renamed, dst / fname, metadata={"format": "pt"})
        new_map.update(dict.fromkeys(renamed, fname))
    index["weight_map"] = new_map
    (dst / INDEX_FILE).write_text(json.dumps(index))
    ckpt = open_checkpoint(dst, layers=(0, 2))
    assert ckpt.prefix == "language_model.model."
    ex = ReferenceExecutor(ckpt, 0, 2)
    out = ex.forward([SequenceInput("s", torch.randn(3, 64), torch.arange(3))])
    assert out[0].shape == (3, 64)


def _fake_hub_cache(cache, repo_id, src, files):
    """Lay out a huggingface_hub cache entry for ``repo_id`` holding only ``files`` of ``src``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(src / f, snap / f)
    return snap


def test_hub_id_resolves_from_offline_cache_with_partial_snapshot(tmp_path, tiny_checkpoint, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    src = tiny_checkpoint("qwen3")
    full = open_checkpoint(src)
    needed = {"config.json", INDEX_FILE, *_files_of_layers(full, 2, 4)}
    _fake_hub_cache(tmp_path, "lpipes-test/tiny", src, needed)
    ckpt = open_checkpoint("lpipes-test/tiny", layers=(2, 4), end_model=False, cache_dir=tmp_path)
    assert ckpt.num_layers == 6
    ex = ReferenceExecutor(ckpt, 2, 4)
    assert ex.forward([SequenceInput("s", torch.randn(2, 64), torch.arange(2))])[0].shape == (2, 64)
    # The end model's shards are not in the partial snapshot: loading it is a clear error, not a crash.
    with pytest.raises(CheckpointError, match="missing"):
        EndModel(ckpt)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        open_checkpoint("nobody/no-such-model", cache_dir=tmp_path)


def test_unknown_architecture(tmp_path, tiny_checkpoint):
    dst = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("qwen3"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "gpt2"  # a real transformers architecture lpipes does not run
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'"):
        open_checkpoint(dst)
    cfg["model_type"] = "no_such_arch_xyz"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="no_such_arch_xyz"):
        open_checkpoint(dst)


def test_missing_files(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path / "empty")
    dst = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("qwen3"), dst)
    ckpt = open_checkpoint(dst)
    victim = sorted(_files_of_layers(ckpt, 3, 4))[0]
    (dst / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard file '{victim}'"):
        ReferenceExecutor(open_checkpoint(dst), 2, 4)
    weights_only = tmp_path / "noweights"
    weights_only.mkdir()
    shutil.copy(dst / "config.json", weights_only / "config.json")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        open_checkpoint(weights_only)


@pytest.mark.parametrize("span", [(0, 0), (4, 2), (-1, 3), (0, 7), (6, 7)])
def test_span_out_of_range(tiny_checkpoint, span):
    with pytest.raises(LayerSpanError, match="out of range"):
        open_checkpoint(tiny_checkpoint("qwen3"), layers=span)


def test_bad_split_points():
    with pytest.raises(LayerSpanError, match="strictly increasing"):
        split_points_to_spans(6, [4, 2])
    with pytest.raises(LayerSpanError):
        split_points_to_spans(6, [6])
    assert split_points_to_spans(6, []) == [(0, 6)]


def test_kv_sharing_span_boundary(tiny_checkpoint):
    with pytest.raises(LayerSpanError, match="reuses the K/V cache of layer 2"):
        open_checkpoint(tiny_checkpoint("gemma4_text"), layers=(3, 6))


def test_prompt_longer_than_context(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    ckpt = open_checkpoint(path)
    gen = Generator(EndModel(ckpt), [ReferenceExecutor(ckpt, 0, 6)])
    ctx = ckpt.context_length
    with pytest.raises(ContextLengthError, match=f"context length is {ctx} tokens") as err:
        next(iter(gen.generate([GenerationRequest([5] * (ctx - 3), SamplingParams(max_tokens=4))])))
    assert err.value.prompt_tokens == ctx - 3 and err.value.context_length == ctx
    # The executor refuses on its own too (a peer must not trust the origin).
    ex = gen.stages[0]
    with pytest.raises(ContextLengthError):
        ex.forward([SequenceInput("s", torch.zeros(ctx + 1, 64), torch.arange(ctx + 1))])
    assert ex.session_length("s") == 0
    with pytest.raises(ValueError, match="empty"):
        next(iter(gen.generate([GenerationRequest([], SamplingParams())])))


def test_executor_input_validation(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("qwen3"), layers=(0, 2))
    ex = ReferenceExecutor(ckpt, 0, 2)
    with pytest.raises(ValueError, match=r"hidden states must be \[T>=1, 64\]"):
        ex.forward([SequenceInput("s", torch.zeros(3, 32), torch.arange(3))])
    with pytest.raises(ValueError, match="positions"):
        ex.forward([SequenceInput("s", torch.zeros(3, 64), torch.arange(2))])
    with pytest.raises(ValueError, match="twice"):
        ex.forward([SequenceInput("s", torch.zeros(1, 64), torch.arange(1))] * 2)
    from lpipes.errors import SessionError

    with pytest.raises(SessionError, match="unknown session"):
        ex.end_session("never")


def test_failed_forward_rolls_back(tiny_checkpoint, monkeypatch):
    """A forward pass that fails half-way leaves every session exactly as it was."""
    ckpt = open_checkpoint(tiny_checkpoint("qwen3"), layers=(0, 2))
    ex, fresh = ReferenceExecutor(ckpt, 0, 2), ReferenceExecutor(ckpt, 0, 2)
    prompt, step = torch.randn(4, 64), torch.randn(2, 64)
    for e in (ex, fresh):
        e.forward([SequenceInput("s", prompt, torch.arange(4))])

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    with monkeypatch.context() as m:
        m.setattr(ex.layers[1], "forward", boom)  # layer 0 has appended its K/V by then
        with pytest.raises(RuntimeError, match="injected"):
            ex.forward([SequenceInput("s", step, torch.arange(4, 6))])
    assert ex.session_length("s") == 4
    got = ex.forward([SequenceInput("s", step, torch.arange(4, 6))])[0]
    want = fresh.forward([SequenceInput("s", step, torch.arange(4, 6))])[0]
    assert torch.equal(got, want) and ex.session_length("s") == 6

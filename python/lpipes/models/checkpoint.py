"""Opening checkpoints and loading only the tensors a node needs.

A node opens a model by local Hugging Face-format directory or by hub id. For a hub
id, only the files its role needs are downloaded: the config, the weight index, the
safetensors shards that hold its layer span (and the end-model tensors if it hosts
the end model), and the tokenizer files for the end model. ``HF_HUB_OFFLINE=1`` is
honoured by huggingface_hub: files then come from the local cache or the call fails
with a clear error.

Tensors are read memory-mapped with ``safetensors.safe_open`` from only the shard
files that hold them; :attr:`Checkpoint.opened_files` records which files were
opened, so tests can prove a span loads nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpipes.errors import CheckpointError, UnsupportedArchitectureError
from lpipes.models.arch import ArchSpec, arch_spec, check_span

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class Checkpoint:
    """An opened checkpoint: its config and a map of where every tensor lives.

    Attributes:
        path: directory holding the (possibly partial) checkpoint files.
        config: the full transformers config (may be a multimodal wrapper).
        text_config: the decoder's text config (``get_text_config(decoder=True)``).
        arch: the architecture adapter for ``text_config.model_type``.
        prefix: the weight-name prefix of the text decoder, e.g. ``"model."`` or
            ``"model.language_model."``; layer ``i`` lives under ``prefix + f"layers.{i}."``.
        weight_map: tensor name → shard file name (relative to ``path``).
        opened_files: shard file names opened so far by :meth:`load_tensors`.
    """

    path: Path
    config: Any
    text_config: Any
    arch: ArchSpec
    prefix: str
    weight_map: dict[str, str]
    opened_files: set[str] = field(default_factory=set)

    @property
    def model_type(self) -> str:
        return str(self.text_config.model_type)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def context_length(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 0) or 0)

    # ------------------------------------------------------------------ names
    def layer_tensor_names(self, layer_idx: int) -> list[str]:
        """Checkpoint names of every tensor of decoder layer ``layer_idx`` (absolute index)."""
        head = f"{self.prefix}layers.{layer_idx}."
        return [name for name in self.weight_map if name.startswith(head)]

    def end_tensor_names(self) -> dict[str, str]:
        """Role → checkpoint name of the end-model tensors (embedding, final norm, head, PLE)."""
        names = {
            "embed_tokens": f"{self.prefix}embed_tokens.weight",
            "norm": f"{self.prefix}norm.weight",
        }
        if not getattr(self.text_config, "tie_word_embeddings", False) and not getattr(
            self.config, "tie_word_embeddings", False
        ):
            heads = [n for n in self.weight_map if n.endswith("lm_head.weight")]
            if not heads:
                raise CheckpointError(
                    f"{self.path}: the config says the LM head is not tied to the embedding, "
                    "but the checkpoint has no lm_head.weight"
                )
            names["lm_head"] = heads[0]
        if self.arch.per_layer_inputs and getattr(self.text_config, "hidden_size_per_layer_input", 0):
            names["embed_tokens_per_layer"] = f"{self.prefix}embed_tokens_per_layer.weight"
            names["per_layer_model_projection"] = f"{self.prefix}per_layer_model_projection.weight"
            names["per_layer_projection_norm"] = f"{self.prefix}per_layer_projection_norm.weight"
        missing = [n for n in names.values() if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{self.path}: end-model tensors missing from the checkpoint: {missing}")
        return names

    def files_for(self, names: Iterable[str]) -> set[str]:
        return {self.weight_map[n] for n in names}

    def tensor_numel(self, names: Iterable[str]) -> int:
        """Elements of the named tensors, read from the safetensors headers (no tensor data is read)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        total = 0
        for fname, fnames in by_file.items():
            fpath = self.path / fname
            if not fpath.is_file():
                continue  # not downloaded (yet); load_tensors reports it
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                for name in fnames:
                    total += math.prod(f.get_slice(name).get_shape())
        return total

    # ---------------------------------------------------------------- loading
    def load_tensors(self, names: Iterable[str]) -> dict[str, Any]:
        """Read the named tensors (memory-mapped) from only the shard files that hold them."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
            by_file[self.weight_map[name]].append(name)
        out: dict[str, Any] = {}
        for fname, fnames in sorted(by_file.items()):
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(
                    f"{self.path}: shard file {fname!r} (holding e.g. {fnames[0]!r}) is missing; "
                    "the download is incomplete or the directory was modified"
                )
            self.opened_files.add(fname)
            try:
                with safe_open(str(fpath), framework="pt", device="cpu") as f:
                    for name in fnames:
                        out[name] = f.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{fpath}: cannot read safetensors file: {exc}") from exc
        return out


# ---------------------------------------------------------------------- opening
def open_checkpoint(
    model: str | Path,
    *,
    layers: tuple[int, int] | None = None,
    end_model: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Checkpoint:
    """Open a checkpoint by local directory or Hugging Face hub id.

    Args:
        model: a local HF-format directory, or a hub id such as ``"Qwen/Qwen3-0.6B"``.
        layers: the span ``(start, end)`` this node will host, or None for none; for a hub
            id only the shards holding these layers are downloaded.
        end_model: whether this node hosts the end model (embedding, norm, head, tokenizer).
        revision, cache_dir: passed to huggingface_hub for hub ids.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        ckpt = _open_dir(local)
    elif _looks_like_path(str(model)):
        raise CheckpointError(f"model directory {str(model)!r} does not exist")
    else:
        ckpt = _open_hub(
            str(model), layers=layers, end_model=end_model, revision=revision, cache_dir=cache_dir
        )
    if layers is not None:
        check_span(ckpt.text_config, *layers)
    return ckpt


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _read_config(path: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig

    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this a Hugging Face model directory?")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {exc}") from exc
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitectureError(
            f"{cfg_file}: transformers cannot read model_type {raw.get('model_type')!r}: {exc}"
        ) from exc
    text_config = config.get_text_config(decoder=True)
    arch_spec(text_config.model_type)  # raises UnsupportedArchitectureError
    return config, text_config


def _weight_map_from_dir(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed safetensors index: {exc}") from exc
        return {str(k): str(v) for k, v in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt", device="cpu") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CheckpointError(
        f"{path}: no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}); "
        "lpipes loads safetensors checkpoints only"
    )


def _find_prefix(weight_map: dict[str, str], where: Path | str) -> str:
    candidates = sorted(
        (n[: -len("embed_tokens.weight")] for n in weight_map if n.endswith("embed_tokens.weight")),
        key=len,
    )
    # Gemma 4 also has "embed_tokens_per_layer.weight"; that never ends in "embed_tokens.weight".
    for prefix in candidates:
        if any(n.startswith(prefix + "layers.") for n in weight_map):
            return prefix
    raise CheckpointError(f"{where}: cannot find the decoder's embed_tokens.weight / layers.N.* tensors")


def _build(path: Path, config: Any, text_config: Any, weight_map: dict[str, str]) -> Checkpoint:
    prefix = _find_prefix(weight_map, path)
    return Checkpoint(
        path=path,
        config=config,
        text_config=text_config,
        arch=arch_spec(text_config.model_type),
        prefix=prefix,
        weight_map=weight_map,
    )


def _open_dir(path: Path) -> Checkpoint:
    config, text_config = _read_config(path)
    return _build(path, config, text_config, _weight_map_from_dir(path))


def _open_hub(
    repo_id: str,
    *,
    layers: tuple[int, int] | None,
    end_model: bool,
    revision: str | None,
    cache_dir: str | Path | None,
) -> Checkpoint:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    kw: dict[str, Any] = {"revision": revision, "cache_dir": str(cache_dir) if cache_dir else None}
    try:
        cfg_path = Path(hf_hub_download(repo_id, CONFIG_FILE, **kw))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"model {repo_id!r} is not in the local Hugging Face cache and cannot be downloaded "
            f"(offline mode or no network): {exc}"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot fetch {CONFIG_FILE} of model {repo_id!r}: {exc}") from exc
    snapshot = cfg_path.parent
    config, text_config = _read_config(snapshot)

    try:
        index_path = Path(hf_hub_download(repo_id, INDEX_FILE, **kw))
        weight_map = {str(k): str(v) for k, v in json.loads(index_path.read_text())["weight_map"].items()}
    except EntryNotFoundError:
        weight_map = {}  # single-file checkpoint: it must be downloaded whole anyway
    except LocalEntryNotFoundError as exc:
        if (snapshot / SINGLE_FILE).is_file():
            weight_map = {}
        else:
            raise CheckpointError(f"model {repo_id!r}: weight index not in the local cache: {exc}") from exc

    patterns = [CONFIG_FILE]
    if weight_map:
        patterns.append(INDEX_FILE)
        prefix = _find_prefix(weight_map, repo_id)
        probe = Checkpoint(
            snapshot, config, text_config, arch_spec(text_config.model_type), prefix, weight_map
        )
        needed: set[str] = set()
        if layers is not None:
            check_span(text_config, *layers)
            for i in range(*layers):
                needed |= probe.files_for(probe.layer_tensor_names(i))
        if end_model:
            needed |= probe.files_for(probe.end_tensor_names().values())
        patterns += sorted(needed)
    else:
        patterns.append(SINGLE_FILE)
    if end_model:
        patterns += list(TOKENIZER_PATTERNS)
    log.info("fetching %d file(s) of %s: %s", len(patterns), repo_id, ", ".join(patterns))
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, **kw))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"model {repo_id!r}: needed files are not in the local cache: {exc}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot download model {repo_id!r}: {exc}") from exc
    return _build(path, config, text_config, weight_map or _weight_map_from_dir(path))


def layer_index(name: str) -> int | None:
    """The absolute layer index in a tensor name like ``model.layers.12.mlp...``, else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None

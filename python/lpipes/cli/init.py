"""`lpipes init`: write a commented node.toml (interactive wizard, or flags for scripts).

On a terminal, ``lpipes init`` asks one question per key (flags given on the command line become the
answers' defaults); with ``--non-interactive``/``-y``, or when stdin is not a terminal, it takes the flags
and the defaults and never prompts. Every answer is checked with the same rules as
:mod:`lpipes.config`, and the finished text is parsed back with ``tomllib`` and
:func:`lpipes.config.parse_config` before it is written (atomically), so ``lpipes init`` never writes a
file that ``lpipes serve --config`` would refuse.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from lpipes.config import (
    ApiConfig,
    ConfigError,
    ModelConfig,
    NetworkConfig,
    NodeConfig,
    listens_everywhere,
    parse_config,
    tomllib,
)
from lpipes.errors import LpipesError

DEFAULT_OUTPUT = "node.toml"
DTYPES: tuple[str, ...] = get_args(ModelConfig.model_fields["dtype"].annotation)
EXECUTORS: tuple[str, ...] = get_args(ModelConfig.model_fields["executor"].annotation)
DEFAULT_MAX_MEMORY_GB: float = ModelConfig.model_fields["max_memory_gb"].default
DEFAULT_KV_CACHE_GB: float = ModelConfig.model_fields["kv_cache_gb"].default
DEFAULT_API_LISTEN: str = ApiConfig.model_fields["listen"].default
DEFAULT_LISTEN: str = NetworkConfig.model_fields["listen"].default

# A Hugging Face hub repository id: "name" or "org/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_NODE_ID_BAD = re.compile(r"[^A-Za-z0-9._-]+")

EXIT_CANCELLED = 130


# --------------------------------------------------------------------------- answers and their checks


@dataclass
class Answers:
    """Everything ``lpipes init`` writes; one field per question."""

    node_id: str
    model_key: str  # "path" or "id"
    model: str  # absolute directory (path) or hub id (id)
    end_model: bool = True
    layers: str | list[int] = "auto"
    dtype: str = "auto"
    executor: str = "auto"
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB
    api_listen: str | None = DEFAULT_API_LISTEN  # None: no [api] table
    api_keys: list[str] = field(default_factory=list)
    listen: str = DEFAULT_LISTEN
    advertise: str | None = None  # None: peers reach this node at listen
    bootstrap: list[str] = field(default_factory=list)
    key_file: str | None = None


def _field_error(cls: type[BaseModel], key: str, value: Any, **others: Any) -> str | None:
    """config.py's own verdict on ``key = value`` (other required keys filled by ``others``)."""
    try:
        cls.model_validate({**others, key: value})
    except ValidationError as exc:
        msgs = [e["msg"].removeprefix("Value error, ") for e in exc.errors() if e["loc"][:1] == (key,)]
        return "; ".join(msgs) or str(exc)
    return None


def _check(cls: type[BaseModel], key: str, value: Any, **others: Any) -> Any:
    msg = _field_error(cls, key, value, **others)
    if msg is not None:
        raise ValueError(msg)
    return value


def default_node_id() -> str:
    """The hostname, with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``-``."""
    name = _NODE_ID_BAD.sub("-", socket.gethostname()).strip("-.")[:64].strip("-.")
    return name or "node-1"


def parse_node_id(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("a node id is required: 1 to 64 of A-Z a-z 0-9 . _ -")
    return _check(NodeConfig, "node_id", text, models=[{"id": "x"}])


def parse_model(text: str) -> tuple[str, str]:
    """``("path", absolute directory)`` when ``text`` is an existing directory, else ``("id", hub id)``."""
    text = text.strip()
    if not text:
        raise ValueError(
            "a model is required: a local Hugging Face directory or a hub id like Qwen/Qwen3-1.7B"
        )
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{text} is a file; a local model is a Hugging Face-format directory")
        return "path", str(local.resolve())
    looks_like_path = text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1
    if looks_like_path or not _HUB_ID.fullmatch(text) or len(text) > 96:
        raise ValueError(f"{text} is neither an existing directory nor a Hugging Face hub id like org/name")
    return "id", text


def parse_layers(text: str) -> str | list[int]:
    text = text.strip().strip("[]()").strip()
    if text.lower() == "auto" or not text:
        return "auto"
    parts = [p.strip() for p in text.split(",")]
    try:
        span = [int(p) for p in parts]
    except ValueError:
        span = []
    if len(span) != 2:
        raise ValueError(f'layers must be "auto" or START,END (END exclusive), e.g. 0,14; got {text!r}')
    return _check(ModelConfig, "layers", span, id="x")


def _gb_parser(key: str) -> Callable[[str], float]:
    def parse(text: str | float) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{key} must be a number of gigabytes > 0, e.g. 2.0; got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number of gigabytes > 0; got {text!r}")
        return _check(ModelConfig, key, value, id="x")

    return parse


parse_max_memory_gb = _gb_parser("max_memory_gb")
parse_kv_cache_gb = _gb_parser("kv_cache_gb")


def _address_parser(
    cls: type[BaseModel], what: str, key: str = "listen", **others: Any
) -> Callable[[str], str]:
    def parse(text: str) -> str:
        text = text.strip()
        msg = _field_error(cls, key, text, **others)
        if msg is not None:
            raise ValueError(msg.replace(f"{key} must", f"{what} must", 1))
        return text

    return parse


# A listen address alone (0.0.0.0 is fine here; the advertise address is asked for then).
parse_listen = _address_parser(NetworkConfig, "listen", advertise="127.0.0.1:1")
parse_advertise = _address_parser(NetworkConfig, "advertise", "advertise")
parse_api_listen = _address_parser(ApiConfig, "listen")
_parse_peer = _address_parser(NetworkConfig, "each bootstrap entry", advertise="127.0.0.1:1")


def _split_list(items: str | Iterable[str]) -> list[str]:
    if isinstance(items, str):
        items = [items]
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def parse_bootstrap(items: str | Iterable[str]) -> list[str]:
    peers = _split_list(items)
    for peer in peers:
        try:
            _parse_peer(peer)
        except ValueError as exc:
            raise ValueError(f"{peer!r}: {exc}") from None
    return _check(NetworkConfig, "bootstrap", peers)


def parse_api_keys(items: str | Iterable[str]) -> list[str]:
    keys = _split_list(items)
    for key in keys:
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError(
                "an API key is sent as `Authorization: Bearer KEY`: no spaces or control characters"
            )
    return _check(ApiConfig, "api_keys", keys)


def parse_key_file(text: str) -> str | None:
    text = text.strip()
    if "\0" in text:
        raise ValueError("a file name cannot hold a NUL character")
    return text or None


def _validator(parse: Callable[[str], Any]) -> Callable[[str], bool | str]:
    """A questionary ``validate=``: True, or the message of what is wrong."""

    def validate(text: str) -> bool | str:
        try:
            parse(text)
        except ValueError as exc:
            return str(exc)
        return True

    return validate


# --------------------------------------------------------------------------- flags → answers


# flag dest → (flag, the key in the file, parser)
_FLAGS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "node_id": ("--node-id", "node_id", parse_node_id),
    "model": ("--model", "models[0].path / models[0].id", parse_model),
    "layers": ("--layers", "models[0].layers", parse_layers),
    "max_memory_gb": ("--max-memory-gb", "models[0].max_memory_gb", parse_max_memory_gb),
    "kv_cache_gb": ("--kv-cache-gb", "models[0].kv_cache_gb", parse_kv_cache_gb),
    "api_listen": ("--api-listen", "api.listen", parse_api_listen),
    "api_key": ("--api-key", "api.api_keys", parse_api_keys),
    "listen": ("--listen", "network.listen", parse_listen),
    "advertise": ("--advertise", "network.advertise", parse_advertise),
    "bootstrap": ("--bootstrap", "network.bootstrap", parse_bootstrap),
    "key_file": ("--key-file", "network.key_file", parse_key_file),
}


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, each parsed and checked; a bad one is a ConfigError naming flag and key."""
    given: dict[str, Any] = {}
    for dest, (flag, key, parse) in _FLAGS.items():
        raw = getattr(args, dest, None)
        if raw is None or (isinstance(raw, list) and not raw):
            continue
        try:
            given[dest] = parse(raw)
        except ValueError as exc:
            shown = " ".join(f"{flag} {r}" for r in raw) if isinstance(raw, list) else f"{flag} {raw}"
            raise ConfigError(f"{shown}: bad value for `{key}`: {exc}") from None
    if "model" in given:
        given["model_text"] = args.model.strip()
    for dest in ("end_model", "dtype", "executor"):
        if getattr(args, dest, None) is not None:
            given[dest] = getattr(args, dest)
    if args.no_api:
        if "api_key" in given:
            raise ConfigError("--api-key needs an [api] table: drop --no-api or the --api-key flags")
        given["api_listen"] = None
    return given


def _answers_from_flags(given: dict[str, Any]) -> Answers:
    if "model" not in given:
        raise ConfigError(
            "--model is required without the wizard (--non-interactive, or stdin is not a terminal): "
            "a local Hugging Face directory or a hub id like Qwen/Qwen3-1.7B"
        )
    model_key, model = given["model"]
    answers = Answers(node_id=given.get("node_id") or default_node_id(), model_key=model_key, model=model)
    for name in ("end_model", "layers", "dtype", "executor", "max_memory_gb", "kv_cache_gb"):
        if name in given:
            setattr(answers, name, given[name])
    if "api_listen" in given:
        answers.api_listen = given["api_listen"]
    answers.api_keys = given.get("api_key", [])
    answers.listen = given.get("listen", DEFAULT_LISTEN)
    answers.advertise = given.get("advertise")
    answers.bootstrap = given.get("bootstrap", [])
    answers.key_file = given.get("key_file")
    return answers


# --------------------------------------------------------------------------- the wizard


class _Cancelled(Exception):
    """The user pressed Ctrl-C (questionary answers None)."""


def _ask(kind: str, message: str, **kwargs: Any) -> Any:
    """One questionary prompt (``kind`` is text, path, select or confirm); None when cancelled.

    The single place the wizard touches the terminal: tests replace it (or questionary's functions).
    """
    import questionary

    return getattr(questionary, kind)(message, **kwargs).ask()


def _q(kind: str, message: str, **kwargs: Any) -> Any:
    answer = _ask(kind, message, **kwargs)
    if answer is None:
        raise _Cancelled
    return answer


def _choice(title: str, value: str) -> Any:
    import questionary

    return questionary.Choice(title=title, value=value)


_DTYPE_HELP = {
    "auto": "float16 where the native executor runs the architecture, else float32",
    "float16": "half precision",
    "bfloat16": "bfloat16 weights and compute",
    "float32": "full precision (slowest, most memory)",
}
_EXECUTOR_HELP = {
    "auto": "native where supported, else reference",
    "native": "fused fp16 kernels (llama family)",
    "reference": "transformers' own layers",
}


def _wizard(given: dict[str, Any]) -> Answers:
    """Ask every question; flags already given are the defaults."""
    node_id = parse_node_id(
        _q(
            "text",
            "Node id (this node's name in the network):",
            default=given.get("node_id") or default_node_id(),
            validate=_validator(parse_node_id),
        )
    )

    model_default = given.get("model_text", "")
    model_text = _q(
        "path",
        "Model (a local Hugging Face directory, or a hub id like Qwen/Qwen3-1.7B):",
        default=model_default,
        validate=_validator(parse_model),
        only_directories=True,
    )
    model_key, model = parse_model(model_text)
    stripped = model_text.strip()
    if model_key == "path" and _HUB_ID.fullmatch(stripped) and "/" in stripped:
        model_key = _q(
            "select",
            f"{stripped} is a local directory and also looks like a hub id. Use:",
            choices=[
                _choice(f"the local directory {model}", "path"),
                _choice(f"the hub id {stripped} (downloaded on demand)", "id"),
            ],
            default="path",
        )
        if model_key == "id":
            model = stripped

    end_model = _q(
        "confirm",
        "Host the end model here (tokenizer, embedding, final norm, LM head, sampling)?",
        default=given.get("end_model", True),
    )

    layers_default = given.get("layers", "auto")
    layers = parse_layers(
        _q(
            "text",
            'Decoder layers to host ("auto", or START,END with END exclusive):',
            default=layers_default if isinstance(layers_default, str) else ",".join(map(str, layers_default)),
            validate=_validator(parse_layers),
        )
    )
    dtype = _q(
        "select",
        "Weights and compute dtype:",
        choices=[_choice(f"{d} ({_DTYPE_HELP.get(d, d)})", d) for d in DTYPES],
        default=given.get("dtype", "auto"),
    )
    executor = _q(
        "select",
        "Layer executor:",
        choices=[_choice(f"{e} ({_EXECUTOR_HELP.get(e, e)})", e) for e in EXECUTORS],
        default=given.get("executor", "auto"),
    )
    max_memory_gb = parse_max_memory_gb(
        _q(
            "text",
            "Weights budget for this node's layers, in GB (max_memory_gb):",
            default=str(given.get("max_memory_gb", DEFAULT_MAX_MEMORY_GB)),
            validate=_validator(parse_max_memory_gb),
        )
    )
    kv_cache_gb = parse_kv_cache_gb(
        _q(
            "text",
            "Paged KV-cache pool, in GB (kv_cache_gb):",
            default=str(given.get("kv_cache_gb", DEFAULT_KV_CACHE_GB)),
            validate=_validator(parse_kv_cache_gb),
        )
    )

    api_listen: str | None = None
    api_keys: list[str] = []
    if _q(
        "confirm",
        "Serve the OpenAI-compatible HTTP API on this node?",
        default=given.get("api_listen", DEFAULT_API_LISTEN) is not None,
    ):
        api_listen = parse_api_listen(
            _q(
                "text",
                "API listen address (HOST:PORT; 0.0.0.0 listens on every interface):",
                default=given.get("api_listen") or DEFAULT_API_LISTEN,
                validate=_validator(parse_api_listen),
            )
        )
        api_keys = parse_api_keys(
            _q(
                "text",
                "API keys, comma separated (empty: no authentication):",
                default=",".join(given.get("api_key", [])),
                validate=_validator(parse_api_keys),
            )
        )

    listen = parse_listen(
        _q(
            "text",
            "Peer network listen address (HOST:PORT, QUIC; 0.0.0.0 listens on every interface):",
            default=given.get("listen", DEFAULT_LISTEN),
            validate=_validator(parse_listen),
        )
    )
    advertise = given.get("advertise")
    if listens_everywhere(listen) or advertise is not None:
        advertise = parse_advertise(
            _q(
                "text",
                "Address the other nodes reach this one at (HOST:PORT: this machine's LAN or VPN address):",
                default=advertise or "",
                validate=_validator(parse_advertise),
            )
        )
    bootstrap = parse_bootstrap(
        _q(
            "text",
            "Bootstrap peers to join, comma separated HOST:PORT (empty: this node starts a network):",
            default=",".join(given.get("bootstrap", [])),
            validate=_validator(parse_bootstrap),
        )
    )
    key_file = parse_key_file(
        _q(
            "text",
            "Network key file (pre-shared secret; empty: an open network):",
            default=given.get("key_file") or "",
            validate=_validator(parse_key_file),
        )
    )
    return Answers(
        node_id=node_id,
        model_key=model_key,
        model=model,
        end_model=end_model,
        layers=layers,
        dtype=dtype,
        executor=executor,
        max_memory_gb=max_memory_gb,
        kv_cache_gb=kv_cache_gb,
        api_listen=api_listen,
        advertise=advertise,
        api_keys=api_keys,
        listen=listen,
        bootstrap=bootstrap,
        key_file=key_file,
    )


# --------------------------------------------------------------------------- rendering


def toml_string(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConfigError(f"{value!r} holds a lone surrogate (U+{code:04X}), which TOML cannot store")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _path_in_file(path: str, config_dir: Path) -> str:
    """Relative to the config's folder when inside it (load_config resolves it there), else absolute."""
    target = Path(path).expanduser().resolve()
    base = config_dir.resolve()
    return target.relative_to(base).as_posix() if target.is_relative_to(base) else str(target)


def render(answers: Answers, *, config_dir: Path, config_name: str = DEFAULT_OUTPUT) -> str:
    """The commented TOML text of ``answers`` (paths written relative to ``config_dir`` when inside it)."""
    v = _toml_value
    serve = f"lpipes serve --config {shlex.quote(config_name)}"
    lines = [
        "# lpipes node configuration, written by `lpipes init`.",
        "#",
        "# Start this node with:",
        "#",
        f"#     {serve}",
        "#",
        "# Every key is documented in docs/configuration.md. Unknown keys and bad values are errors;",
        "# relative paths (path, key_file) are resolved against this file's folder.",
        "",
        "# This node's name in the network: 1 to 64 of A-Z a-z 0-9 . _ -",
        f"node_id = {v(answers.node_id)}",
        "",
        "[network]",
        "# QUIC address (HOST:PORT) this node listens on for its peers.",
        f"listen = {v(answers.listen)}",
    ]
    if answers.advertise is not None:
        lines += ["# The address the other nodes reach this one at.", f"advertise = {v(answers.advertise)}"]
    lines += [
        "# Peers (HOST:PORT) to join; empty: this node starts a new network.",
        f"bootstrap = {v(answers.bootstrap)}",
        "# Pre-shared network key file; absent: an open network anyone can join (logged as such).",
    ]
    if answers.key_file is not None:
        lines.append(f"key_file = {v(_path_in_file(answers.key_file, config_dir))}")
    else:
        lines.append('# key_file = "network.key"')
    lines.append("")
    api_lines = [
        "[api]",
        "# HTTP address (HOST:PORT) of the OpenAI-compatible API (/v1/chat/completions, /v1/models, ...).",
        f"listen = {v(answers.api_listen or DEFAULT_API_LISTEN)}",
        "# Accepted `Authorization: Bearer` tokens; empty: no authentication.",
        f"api_keys = {v(answers.api_keys)}",
    ]
    if answers.api_listen is not None:
        lines += api_lines
    else:
        lines.append("# No [api] table: this node serves no HTTP API. To serve one, uncomment:")
        lines += [line if line.startswith("#") else "# " + line for line in api_lines]
    lines += ["", "[[models]]"]
    if answers.model_key == "path":
        lines += [
            "# A local Hugging Face-format directory (safetensors); wins over `id`.",
            f"path = {v(_path_in_file(answers.model, config_dir))}",
        ]
    else:
        lines += [
            "# A Hugging Face hub id, downloaded on demand: only the files this node's role needs",
            "# (HF_HUB_OFFLINE=1 honoured). Or give `path`, a local directory, which wins over `id`.",
            f"id = {v(answers.model)}",
        ]
    lines += [
        "# Host the end model here: tokenizer, embedding, final norm, LM head and sampling.",
        f"end_model = {v(answers.end_model)}",
        '# Decoder layers to host: "auto", or [start, end] with end exclusive.',
        f"layers = {v(answers.layers)}",
        "# Compute device (CPU only today).",
        'device = "cpu"',
        f"# Weights and compute dtype: {', '.join(DTYPES)}.",
        f"# auto: {_DTYPE_HELP['auto']}.",
        f"dtype = {v(answers.dtype)}",
        "# Layer executor: native (fused kernels, llama family), reference (transformers' own layers),",
        "# or auto: native where supported, else reference.",
        f"executor = {v(answers.executor)}",
        "# Weights budget for this node's layers, in GB.",
        f"max_memory_gb = {v(float(answers.max_memory_gb))}",
        "# Paged KV-cache pool, in GB; memory is committed only as blocks fill.",
        f"kv_cache_gb = {v(float(answers.kv_cache_gb))}",
    ]
    return "\n".join(lines) + "\n"


def validate_text(text: str, source: str) -> None:
    """Parse ``text`` back exactly as ``lpipes serve`` will; a ConfigError names the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a bug in render(), never the user's
        raise ConfigError(f"{source}: lpipes init produced invalid TOML ({exc}); nothing written") from None
    parse_config(data, source=source)


# --------------------------------------------------------------------------- writing


def _write_atomically(path: Path, text: str, *, private: bool) -> None:
    """temp file in the same folder + os.replace; 0600 when it holds API keys, else umask-default."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise LpipesError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise LpipesError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed or detached stdin
        return False


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"
    out = Path(os.path.expanduser(args.output))
    config_dir = Path.cwd() if to_stdout else out.parent
    interactive = not args.non_interactive and _stdin_is_tty()

    given = _flag_values(args)  # bad flags fail before any question
    if not to_stdout and out.is_dir():
        raise LpipesError(f"{out} is a directory; give the file to write with --output FILE")
    try:
        if not to_stdout and out.exists() and not args.force:
            if not interactive:
                raise LpipesError(f"{out} already exists; pass --force to overwrite it (or -o another file)")
            if not _q("confirm", f"{out} already exists. Overwrite it?", default=False):
                raise LpipesError(f"{out} already exists; not overwritten (pass --force, or -o another file)")
        answers = _wizard(given) if interactive else _answers_from_flags(given)
    except _Cancelled:
        _say("lpipes init: cancelled; nothing written")
        return EXIT_CANCELLED

    name = "node.toml" if to_stdout else args.output
    text = render(answers, config_dir=config_dir, config_name=name)
    validate_text(text, source=name)
    if to_stdout:
        sys.stdout.write(text)
        return 0
    _write_atomically(out, text, private=bool(answers.api_keys))

    _say(f"wrote {out}")
    if answers.model_key == "id":
        _say(f"model {answers.model} comes from the Hugging Face hub, downloaded on first start")
    if answers.key_file is not None and not Path(answers.key_file).expanduser().exists():
        _say(f"note: the network key file {answers.key_file} does not exist yet")
    if answers.api_listen is None or not answers.end_model:
        _say(
            "note: `lpipes serve` today runs a node that serves the API and hosts the end model and every "
            "layer; this configuration waits for the peer network"
        )
    _say(f"next: lpipes serve --config {shlex.quote(args.output)}")
    return 0


# --------------------------------------------------------------------------- argparse


_DESCRIPTION = """\
Write a commented node configuration (TOML) that `lpipes serve --config FILE` accepts.

On a terminal, a wizard asks for each key; flags given on the command line become the defaults of its
questions. With --non-interactive/-y, or when stdin is not a terminal, no question is asked: the flags
and the defaults are written (then --model is required). Every value is checked with the rules of
`lpipes serve`, and the file is parsed back before it is written, so a bad value is an error that names
the key and nothing is written. See docs/configuration.md for every key."""

_EPILOG = """\
examples:
  lpipes init                                        # the wizard
  lpipes init -y --model Qwen/Qwen3-1.7B             # a hub model, every other key at its default
  lpipes init -y --model ./qwen3 --node-id gpu-1 --api-listen 0.0.0.0:8000 --api-key s3cret -o gpu-1.toml
  lpipes init -y --model Qwen/Qwen3-1.7B --no-end-model --layers 14,28 --no-api \\
      --bootstrap 10.0.0.1:5000 --key-file network.key -o peer.toml"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write a node configuration (interactive wizard, or flags for scripts)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-o",
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="FILE",
        help=f"the file to write (default {DEFAULT_OUTPUT}; '-' prints it to stdout)",
    )
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists (else: an error)")
    p.add_argument(
        "-y",
        "--non-interactive",
        action="store_true",
        help="never prompt: use the flags and the defaults (implied when stdin is not a terminal)",
    )
    node = p.add_argument_group("node")
    node.add_argument(
        "--node-id",
        metavar="ID",
        help="this node's name in the network, 1-64 of A-Z a-z 0-9 . _ - (default: the hostname, sanitised)",
    )
    model = p.add_argument_group("model ([[models]])")
    model.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="a local Hugging Face directory (written as `path`) or a hub id like Qwen/Qwen3-1.7B "
        "(written as `id`, downloaded on demand); required with --non-interactive",
    )
    model.add_argument(
        "--end-model",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="host the tokenizer, embedding, final norm, LM head and sampling here (default: yes)",
    )
    model.add_argument(
        "--layers",
        metavar="auto|START,END",
        help='decoder layers to host: "auto" (default) or START,END with END exclusive, e.g. 0,14',
    )
    model.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help=f"weights and compute dtype (default auto: {_DTYPE_HELP['auto']})",
    )
    model.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="layer executor: native (fused kernels, llama family), reference (transformers' layers), "
        "or auto (default): native where supported",
    )
    model.add_argument(
        "--max-memory-gb",
        metavar="GB",
        help=f"weights budget for this node's layers (default {DEFAULT_MAX_MEMORY_GB})",
    )
    model.add_argument(
        "--kv-cache-gb", metavar="GB", help=f"paged KV-cache pool (default {DEFAULT_KV_CACHE_GB})"
    )
    api = p.add_argument_group("HTTP API ([api])")
    api_where = api.add_mutually_exclusive_group()
    api_where.add_argument(
        "--api-listen",
        metavar="HOST:PORT",
        help=f"address of the OpenAI-compatible API (default {DEFAULT_API_LISTEN})",
    )
    api_where.add_argument(
        "--no-api", action="store_true", help="no [api] table: this node serves no HTTP API"
    )
    api.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="an accepted `Authorization: Bearer` token (repeatable; default: none, no authentication)",
    )
    net = p.add_argument_group("peer network ([network])")
    net.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"QUIC address to listen on for peers (default {DEFAULT_LISTEN})",
    )
    net.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the address other nodes reach this one at (default: the --listen address; required "
        "with --listen 0.0.0.0:PORT)",
    )
    net.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a peer to join (repeatable, or comma separated; default: none, this node starts a network)",
    )
    net.add_argument(
        "--key-file",
        metavar="FILE",
        help="pre-shared network key file (default: none, an open network)",
    )
    p.set_defaults(handler=run)

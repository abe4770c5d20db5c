"""Node configuration: ``lpipes serve --config node.toml`` → validated settings.

Every key is declared once here, with its default and meaning; ``docs/configuration.md``
documents the same keys. Unknown keys and bad values are errors that name the file, the
key and what is allowed — a typo never silently falls back to a default.

Example::

    node_id = "node-1"

    [network]
    listen = "127.0.0.1:5000"          # QUIC peer port
    bootstrap = ["127.0.0.1:5001"]     # empty or absent: this node starts a network
    key_file = "network.key"           # shared secret; absent = open network (explicit, logged)
    max_sessions = 128                 # sessions with KV on this node at most
    max_frame_mb = 256                 # largest frame sent or accepted

    [api]                              # absent = no HTTP API on this node
    listen = "127.0.0.1:8000"

    [[models]]
    path = "/models/qwen3-1.7b"        # a local HF-format directory (wins over id) ...
    id = "Qwen/Qwen3-1.7B"             # ... or a hub id, downloaded on demand
    end_model = true                   # host tokenizer/embedding/norm/head here
    layers = "auto"                    # or [start, end)
    device = "cpu"
    dtype = "float16"
    max_memory_gb = 2.0                # weights budget for layers
    kv_cache_gb = 0.5                  # paged KV pool
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lpipes.api.limits import HttpLimits, RequestLimits
from lpipes.errors import LpipesError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(LpipesError, ValueError):
    """A configuration file is missing, not valid TOML, or has unknown keys or bad values."""


def _check_address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:5000")
    return value


def listens_everywhere(address: str) -> bool:
    """True for ``0.0.0.0:PORT`` / ``[::]:PORT``: every interface, a place to listen at but not an
    address to be reached at."""
    return address.rpartition(":")[0] in ("0.0.0.0", "::", "[::]")


def _reachable(value: str, what: str, hint: str) -> str:
    """``value`` (a checked HOST:PORT) if its host can be connected to."""
    if listens_everywhere(value):
        raise ValueError(
            f"{what} {value!r} is not an address a node can be reached at (0.0.0.0 and :: mean every "
            f"interface): {hint}"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkConfig(_Strict):
    listen: str = "127.0.0.1:5000"  # QUIC peer address this node listens on
    # The address other nodes reach this one at (its peer record, replies); None: listen. Needed when
    # listen is 0.0.0.0 / :: (every interface), or behind a port forward.
    advertise: str | None = None
    bootstrap: list[str] = []  # peers to join; empty: this node starts a network
    key_file: Path | None = None  # pre-shared network key; None: open network (logged)
    gossip_interval_s: Annotated[float, Field(ge=0.05, le=60)] = 1.0  # peer-record exchange period
    peer_timeout_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0  # a silent peer is dropped after this
    session_timeout_s: Annotated[float, Field(ge=1, le=86400)] = 600.0  # idle sessions' KV is freed after
    step_timeout_s: Annotated[float, Field(ge=1, le=3600)] = 300.0  # longest one step may take on a route
    join_timeout_s: Annotated[float, Field(ge=0, le=600)] = 10.0  # how long to wait for a bootstrap peer
    # Sessions with KV on this node at most (every origin's together); a step that would open one more is
    # refused and the origin fails it over. 128 = 8 origins decoding max_batch_size = 16 each.
    max_sessions: Annotated[int, Field(ge=1, le=1 << 20)] = 128
    # Largest frame this node sends or accepts, in MiB (2^20 bytes); checked from a frame's header before
    # anything is allocated. 256: a max_batch_tokens = 2048 prefill in float32 of hidden size 16384 (the
    # largest open models) is 2048 x 16384 x 4 B = 128 MiB, twice over; a small model needs far less.
    max_frame_mb: Annotated[int, Field(ge=1, le=1024)] = 256
    # After sending a step's frame, keep polling for the next one this long (µs) instead of sleeping;
    # 0: off. Spends a core while it waits, saves the wake-up on every hop (lpipes.net.poll).
    busy_poll_us: Annotated[int, Field(ge=0, le=1_000_000)] = 0

    @property
    def max_frame_bytes(self) -> int:
        return self.max_frame_mb << 20

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_address(v, "listen")

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, v: str | None) -> str | None:
        return (
            None
            if v is None
            else _reachable(
                _check_address(v, "advertise"), "advertise", "use this machine's LAN or VPN address"
            )
        )

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, v: list[str]) -> list[str]:
        return [
            _reachable(
                _check_address(a, "each bootstrap entry"),
                "bootstrap entry",
                "use the address that peer advertises",
            )
            for a in v
        ]

    @model_validator(mode="after")
    def _advertised(self) -> NetworkConfig:
        if self.advertise is None and listens_everywhere(self.listen):
            port = self.listen.rpartition(":")[2]
            raise ValueError(
                f"[network] listen = {self.listen!r} listens on every interface, but the other nodes "
                f'need one address to reach this node at: set [network] advertise = "HOST:{port}" '
                "(this machine's LAN or VPN address), or listen on that address"
            )
        return self

    @property
    def address(self) -> str:
        """The address this node is reached at: ``advertise``, else ``listen``."""
        return self.advertise or self.listen


class ApiConfig(_Strict):
    listen: str = "127.0.0.1:8000"  # HTTP address of the OpenAI-compatible API
    api_keys: list[str] = []  # accepted Bearer tokens; empty: no authentication
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16  # requests decoded together at most
    max_queued_requests: Annotated[int, Field(ge=0)] = 64  # waiting beyond the batch; more get 503
    max_batch_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 2048  # tokens one step runs at most
    prefill_chunk_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 512  # prompt tokens per request a step
    pipeline_depth: Annotated[int, Field(ge=1, le=16)] = 2  # networked origin: lanes of steps in flight
    # Request limits. Prompts are refused (400) before they reach the engine's queue; the defaults keep
    # a small machine alive with a request nobody would send in good faith.
    max_prompt_tokens: Annotated[int, Field(ge=0)] = 0  # 0: the context length (what the KV pool holds)
    # Cap on max_tokens / max_completion_tokens, and the default when a request sets neither. 4096 bounds
    # how long one request holds a batch slot; 0: no cap but the context length.
    max_new_tokens: Annotated[int, Field(ge=0)] = 4096
    # Largest request body, refused with 413 from Content-Length or while reading. 2 MiB holds a
    # 128k-token prompt as token ids; max_connections bodies at once bound what requests can occupy.
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 2 << 20
    # HTTP connections. Beyond max_connections a new connection gets 503 and is half-closed at once, so
    # sockets (file descriptors) and buffers stay bounded; 128 leaves room above the default 16 + 64
    # requests the engine holds for health checks, metrics and status.
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 128
    header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0  # request line + headers arrive within
    body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0  # the whole body arrives within (408)
    send_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0  # a client reading nothing this long is cut

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_address(v, "listen")

    @model_validator(mode="after")
    def _budget(self) -> ApiConfig:
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_batch_size "
                f"({self.max_batch_size}): every decoding sequence takes one token of a step's budget"
            )
        return self

    def engine_options(self) -> dict[str, int]:
        """The :class:`~lpipes.generation.engine.Engine` keyword arguments these settings give."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_queued": self.max_queued_requests,
            "max_batch_tokens": self.max_batch_tokens,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "pipeline_depth": self.pipeline_depth,
        }

    def request_limits(self) -> RequestLimits:
        """What the API checks of each request (:class:`lpipes.api.server.Service`)."""
        return RequestLimits(
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_body_bytes=self.max_body_bytes,
            body_timeout_s=self.body_timeout_s,
        )

    def http_limits(self) -> HttpLimits:
        """What the HTTP server enforces per connection (:mod:`lpipes.api.connections`)."""
        return HttpLimits(
            max_connections=self.max_connections,
            header_timeout_s=self.header_timeout_s,
            send_timeout_s=self.send_timeout_s,
        )


class ModelConfig(_Strict):
    id: str | None = None  # Hugging Face hub id, downloaded on demand (only the files this node needs)
    path: Path | None = None  # local HF-format directory; wins over id
    end_model: bool = False  # host the tokenizer, embedding, final norm, LM head and sampling
    layers: Literal["auto"] | Annotated[list[int], Field(min_length=2, max_length=2)] = "auto"  # [start, end)
    device: Literal["cpu"] = "cpu"  # only CPU today
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = (
        "auto"  # auto: float16 where native, else float32
    )
    executor: Literal["auto", "native", "reference"] = "auto"  # layer executor
    max_memory_gb: Annotated[float, Field(gt=0)] = 2.0  # weights budget for this node's layers
    kv_cache_gb: Annotated[float, Field(gt=0)] = 0.5  # paged KV pool
    keep_first_span: bool = False  # origin: never send raw embeddings; run layers from 0 here

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, list):
            start, end = v
            if not 0 <= start < end:
                raise ValueError(f'layers must be "auto" or [start, end) with 0 <= start < end, got {v}')
        return v

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.id is None and self.path is None:
            raise ValueError("a model needs `path` (a local directory) or `id` (a Hugging Face hub id)")
        return self

    @model_validator(mode="after")
    def _first_span(self) -> ModelConfig:
        if self.keep_first_span and not self.end_model:
            raise ValueError("keep_first_span applies to the origin (end_model = true) only")
        if self.keep_first_span and self.span is not None and self.span[0] != 0:
            raise ValueError(f"keep_first_span needs layers starting at 0, got {list(self.span)}")
        return self

    @property
    def source(self) -> str:
        """What to open: the local path if given, else the hub id."""
        return str(self.path) if self.path is not None else str(self.id)

    @property
    def span(self) -> tuple[int, int] | None:
        return None if self.layers == "auto" else (self.layers[0], self.layers[1])


class NodeConfig(_Strict):
    node_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    network: NetworkConfig = NetworkConfig()
    api: ApiConfig | None = None  # absent: no HTTP API on this node
    models: Annotated[list[ModelConfig], Field(min_length=1)]


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key `{loc}`"
    if kind == "missing":
        return f"missing required key `{loc}`"
    msg = err["msg"].removeprefix("Value error, ")
    return f"`{loc}`: {msg} (got {err.get('input')!r})" if loc else msg


def parse_config(data: dict[str, Any], *, source: str = "<config>") -> NodeConfig:
    """Validate a parsed TOML document; raises :class:`ConfigError` listing every problem."""
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n{problems}") from None


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate a node's TOML file. Relative paths in it are resolved against its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, source=str(path))
    base = path.resolve().parent

    def resolve(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    models = [m.model_copy(update={"path": resolve(m.path) or m.path}) for m in config.models]
    update: dict[str, Any] = {"models": models}
    if "network" in config.model_fields_set:  # kept unset when absent: serve and status tell them apart
        update["network"] = config.network.model_copy(
            update={"key_file": resolve(config.network.key_file) or config.network.key_file}
        )
    return config.model_copy(update=update)

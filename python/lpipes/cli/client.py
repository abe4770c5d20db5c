"""`lpipes chat` and `lpipes status`: clients of a running node's HTTP API.

Both talk HTTP only (``httpx``) and never import torch or transformers, so they start fast.
The pieces are small pure functions (:func:`iter_sse_deltas`, :func:`status_table`, ...) plus
:class:`ApiClient` / :class:`ChatSession` / :func:`chat_loop`, whose input and output are
injectable callables so the interactive loop can be driven from tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from typing import Any

import httpx
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lpipes.errors import LpipesError

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "LPIPES_API_KEY"
STATUS_PATH = "/lpipes/status"


class ServerError(LpipesError):
    """The server answered with an HTTP error; ``str()`` is ``"<message> (HTTP <status>)"``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.message = message
        self.status = status


# --------------------------------------------------------------------------------------------------
# Pure helpers


def normalize_url(url: str) -> str:
    """``http://host:port`` from a URL given with or without a scheme, trailing ``/`` or ``/v1``."""
    url = url.strip()
    if not url:
        raise LpipesError("--url is empty; give the node's API address, e.g. http://127.0.0.1:8000")
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise LpipesError(f"--url must be an http:// or https:// address, got {url!r}")
    return url


def url_from_listen(listen: str) -> str:
    """The URL a client uses to reach an ``[api].listen = "HOST:PORT"`` address."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def error_message(body: bytes | str, fallback: str) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else a short excerpt of the body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if isinstance(data.get("detail"), str):
            return data["detail"]
    text = " ".join(text.split())
    if not text:
        return fallback
    return text if len(text) <= 200 else text[:200] + "..."


def iter_sse_deltas(lines: Iterable[str]) -> Iterator[str]:
    """Text deltas of an OpenAI chat-completions SSE stream, given its lines.

    Reads ``data: {...}`` lines until ``data: [DONE]`` and yields each non-empty
    ``choices[0].delta.content``. Comments, blank lines and other SSE fields are skipped.
    Raises :class:`LpipesError` on a malformed chunk, an in-stream error object, or a stream that
    ends without ``[DONE]``.
    """
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        if not payload:
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise LpipesError(f"the server sent a malformed stream chunk: {payload[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise LpipesError(f"the server sent a malformed stream chunk: {payload[:200]!r}")
        if chunk.get("error"):
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            raise LpipesError(f"the server reported an error mid-stream: {msg}")
        choices = chunk.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            continue  # e.g. a final usage-only chunk
        delta = choices[0].get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content:
            yield content
    raise LpipesError("the stream ended before `data: [DONE]`; the server may have stopped mid-reply")


def human_bytes(n: float) -> str:
    """``512 B``, ``1.2 KiB``, ``512.0 MiB``, ..."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``12s``, ``3m 05s``, ``2h 03m``, ``1d 02h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


_STATUS_REQUIRED: dict[str, tuple[str, ...]] = {
    "": ("node_id", "model", "stages", "requests"),
    "model": ("name", "num_layers"),
    "stage": ("layers", "kv_blocks_used", "kv_blocks_total"),
    "requests": ("active", "queued", "served"),
}


def validate_status(data: Any) -> dict[str, Any]:
    """Check that a ``/lpipes/status`` reply has the keys :func:`status_table` needs (extra keys are fine)."""
    if not isinstance(data, dict):
        raise LpipesError(f"the status reply is not a JSON object: {str(data)[:200]}")
    missing = [k for k in _STATUS_REQUIRED[""] if k not in data]
    model, stages, requests = data.get("model"), data.get("stages"), data.get("requests")
    if "model" in data:
        if isinstance(model, dict):
            missing += [f"model.{k}" for k in _STATUS_REQUIRED["model"] if k not in model]
        else:
            missing.append("model (an object)")
    if "requests" in data:
        if isinstance(requests, dict):
            missing += [f"requests.{k}" for k in _STATUS_REQUIRED["requests"] if k not in requests]
        else:
            missing.append("requests (an object)")
    if "stages" in data:
        if isinstance(stages, list):
            for i, st in enumerate(stages):
                if not isinstance(st, dict):
                    missing.append(f"stages[{i}] (an object)")
                    continue
                missing += [f"stages[{i}].{k}" for k in _STATUS_REQUIRED["stage"] if k not in st]
                span = st.get("layers")
                if "layers" in st and not (
                    isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
                ):
                    missing.append(f"stages[{i}].layers as [start, end)")
        else:
            missing.append("stages (a list)")
    if missing:
        raise LpipesError(
            "the status reply is missing or has malformed keys: "
            + ", ".join(missing)
            + "; is the server an lpipes node of a matching version?"
        )
    return data


def _span(stage: dict[str, Any]) -> str:
    start, end = stage["layers"]
    return f"[{start}, {end})"


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def status_table(data: dict[str, Any], url: str | None = None) -> Group:
    """A rich renderable of a ``/lpipes/status`` reply: header, model table, KV table, request counts."""
    data = validate_status(data)
    model, stages, reqs = data["model"], data["stages"], data["requests"]

    header = Text()
    header.append("node ", style="bold")
    header.append(str(data["node_id"]), style="bold cyan")
    if data.get("version") is not None:
        header.append(f"  lpipes {data['version']}")
    if isinstance(data.get("uptime_s"), (int, float)):
        header.append(f"  up {human_duration(data['uptime_s'])}")
    if url:
        header.append(f"  {url}", style="dim")

    mt = Table(title="Model", title_justify="left", show_header=False, box=None, padding=(0, 2))
    mt.add_column(style="bold")
    mt.add_column()
    executors = sorted({str(st.get("executor")) for st in stages if st.get("executor") is not None})
    end_model = model.get("end_model")
    rows = [
        ("name", _opt(model.get("name"))),
        ("source", _opt(model.get("source"))),
        (
            "layers held",
            (", ".join(_span(st) for st in stages) or "none") + f" of {model['num_layers']}",
        ),
        ("executor", ", ".join(executors) or "-"),
        ("dtype", _opt(model.get("dtype"))),
        ("context length", _opt(model.get("context_length"))),
        ("end model", "-" if end_model is None else ("yes" if end_model else "no")),
    ]
    for key, value in rows:
        mt.add_row(key, Text(value))

    kv = Table(title="KV cache", title_justify="left")
    kv.add_column("layers")
    kv.add_column("executor")
    kv.add_column("blocks used / total", justify="right")
    kv.add_column("used", justify="right")
    kv.add_column("memory used / total", justify="right")
    kv.add_column("block size", justify="right")
    kv.add_column("sessions", justify="right")
    for st in stages:
        used, total = st["kv_blocks_used"], st["kv_blocks_total"]
        pct = f"{100.0 * used / total:.1f}%" if total else "-"
        block_bytes = st.get("kv_block_bytes")
        memory = (
            f"{human_bytes(used * block_bytes)} / {human_bytes(total * block_bytes)}"
            if isinstance(block_bytes, (int, float))
            else "-"
        )
        size = st.get("kv_block_size")
        kv.add_row(
            _span(st),
            _opt(st.get("executor")),
            f"{used} / {total}",
            pct,
            memory,
            "-" if size is None else f"{size} tokens",
            _opt(st.get("sessions")),
        )

    counts = Text()
    counts.append("requests ", style="bold")
    counts.append(f"{reqs['active']} active, {reqs['queued']} queued, {reqs['served']} served")
    return Group(header, Text(""), mt, Text(""), kv, Text(""), counts)


# --------------------------------------------------------------------------------------------------
# HTTP


class ApiClient:
    """A thin ``httpx`` client of a node's API with lpipes-style errors. Use as a context manager."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base = normalize_url(url)
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.base, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _transport_error(self, exc: httpx.HTTPError) -> LpipesError:
        if isinstance(exc, httpx.ConnectError):
            return LpipesError(
                f"cannot connect to {self.base} ({exc}); is an lpipes node serving there? "
                "Start one with `lpipes serve --config node.toml`, or pass --url"
            )
        if isinstance(exc, httpx.TimeoutException):
            return LpipesError(f"{self.base} did not answer in time ({type(exc).__name__})")
        return LpipesError(f"HTTP request to {self.base} failed: {exc or type(exc).__name__}")

    def _check(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            raise ServerError(error_message(r.read(), r.reason_phrase or "error"), r.status_code)

    def get_json(self, path: str) -> Any:
        try:
            r = self.http.get(path)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        self._check(r)
        try:
            return r.json()
        except ValueError:
            raise LpipesError(f"GET {self.base}{path} did not return JSON: {r.text[:200]!r}") from None

    def first_model(self) -> str:
        data = self.get_json("/v1/models")
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list) or not models:
            raise LpipesError(f"{self.base}/v1/models lists no models; pass --model")
        first = models[0]
        if not isinstance(first, dict) or not first.get("id"):
            raise LpipesError(f"{self.base}/v1/models returned an entry without an id; pass --model")
        return str(first["id"])

    def stream_chat(self, body: dict[str, Any]) -> Iterator[str]:
        """POST a streaming chat completion and yield its text deltas. Closing the iterator closes
        the connection (the server then stops the generation)."""
        try:
            with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                self._check(r)
                yield from iter_sse_deltas(r.iter_lines())
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None

    def status(self) -> Any:
        try:
            return self.get_json(STATUS_PATH)
        except ServerError as exc:
            if exc.status == 404:
                raise LpipesError(
                    f"this server does not report status; is it an lpipes node? "
                    f"(GET {self.base}{STATUS_PATH}: HTTP 404)"
                ) from None
            raise


# --------------------------------------------------------------------------------------------------
# chat


class ChatSession:
    """One conversation: the request parameters and the message history (system, user, assistant...)."""

    def __init__(
        self,
        client: ApiClient,
        model: str,
        *,
        system: str | None = None,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def request_body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Send ``text`` as the next user message, ``write`` each delta as it arrives, and return the
        whole reply. The turn joins the history only once the reply is complete: an error or a
        KeyboardInterrupt (which closes the stream) leaves the history as it was."""
        messages = [*self.messages, {"role": "user", "content": text}]
        parts: list[str] = []
        with closing(self.client.stream_chat(self.request_body(messages))) as deltas:
            for delta in deltas:
                parts.append(delta)
                write(delta)
        answer = "".join(parts)
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer


def chat_loop(
    session: ChatSession,
    read: Callable[[], str],
    write: Callable[[str], None],
    notify: Callable[[str], None],
) -> int:
    """The interactive prompt loop. ``read()`` returns the next input line (raising EOFError or
    KeyboardInterrupt to quit), ``write`` receives reply text, ``notify`` status and error lines.
    Commands: ``/exit``, ``/quit``, ``/reset``. Returns the exit status (0)."""
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            notify("(conversation reset)")
            continue
        if text.startswith("/") and " " not in text:
            notify(f"unknown command {text}; commands: /reset, /exit, /quit")
            continue
        try:
            session.reply(text, write)
        except KeyboardInterrupt:
            write("\n")
            notify("(reply cancelled)")
            continue
        except LpipesError as exc:
            write("\n")
            notify(f"lpipes: error: {exc}")
            continue
        write("\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_chat(args: argparse.Namespace) -> int:
    message = args.message
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read().strip()
        if not message:
            raise LpipesError("stdin is not a terminal and held no message; pass -m TEXT or type one")
    with ApiClient(args.url, _api_key(args)) as client:
        model = args.model or client.first_model()
        session = ChatSession(
            client,
            model,
            system=args.system,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        if message is not None:  # one-shot: only the model text goes to stdout
            session.reply(message, _stdout_write)
            _stdout_write("\n")
            return 0

        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - not on every platform
            pass
        out, err = Console(highlight=False), Console(stderr=True, highlight=False)
        err.print(
            f"chatting with [bold]{model}[/bold] at {client.base} "
            "([dim]/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply[/dim])",
        )

        def read() -> str:
            return out.input("[bold green]>>>[/bold green] ")

        def notify(text: str) -> None:
            err.print(Text(text, style="red" if text.startswith("lpipes: error") else "dim"))

        return chat_loop(session, read, _stdout_write, notify)


# --------------------------------------------------------------------------------------------------
# status


def run_status(args: argparse.Namespace) -> int:
    if args.config is not None:
        from lpipes.config import load_config

        cfg = load_config(args.config)
        if "network" in cfg.model_fields_set or cfg.api is None:
            return _run_network_status(cfg, args.json)
        url = url_from_listen(cfg.api.listen)
    else:
        url = args.url or DEFAULT_URL
    with ApiClient(url, _api_key(args), timeout=30.0) as client:
        data = client.status()
        base = client.base
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    renderable = status_table(data, url=base)
    # Piped output has no terminal width; 120 columns keeps the tables from wrapping cells.
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(renderable)
    return 0


def _run_network_status(cfg: Any, as_json: bool) -> int:
    from lpipes.cli.netstatus import network_table, query_network

    data = query_network(cfg)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(network_table(data))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="streaming terminal chat against an OpenAI-compatible API",
        description="Chat with a model served by `lpipes serve` (or any OpenAI-compatible API). "
        "Interactive on a terminal; with -m, or a message piped on stdin, send one message, print only "
        "the reply on stdout and exit.",
    )
    p.add_argument(
        "--url", default=DEFAULT_URL, help=f"the API's address, with or without /v1 (default {DEFAULT_URL})"
    )
    p.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    p.add_argument(
        "--api-key", default=None, help=f"Bearer token for the API (default: ${API_KEY_ENV} if set)"
    )
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the chat")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        help="tokens per reply at most (default: the server's, i.e. up to the end of the context)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible replies)")
    p.add_argument(
        "-m",
        "--message",
        default=None,
        metavar="TEXT",
        help="one-shot: send this message, print the reply and exit",
    )
    p.set_defaults(handler=run_chat)

    p = sub.add_parser(
        "status",
        help="a node's model, layer span and KV usage; with --config, every peer of its network",
        description="Show what a running node serves: its model, the layers it holds, KV-cache usage "
        "per stage and request counts (GET /lpipes/status). With --config on a node that has a "
        "[network] table (or no [api]), ask the node over the peer network instead: every peer it "
        "knows (node id, address, layers, KV blocks, last seen) and how many peers hold each layer.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"the node's API address (default {DEFAULT_URL})")
    where.add_argument(
        "--config",
        default=None,
        metavar="NODE_TOML",
        help="the node of this file: its peer network ([network].listen, key_file) or its [api].listen",
    )
    p.add_argument(
        "--api-key", default=None, help=f"Bearer token for the API (default: ${API_KEY_ENV} if set)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of tables (with --config on a network node: per peer node_id, "
        "address, model, layers, kv_blocks_used, kv_blocks_total, last_seen)",
    )
    p.set_defaults(handler=run_status)

"""The OpenAI-compatible HTTP API of a node holding the end model.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as SSE or
not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus),
``GET /lpipes/status`` (what ``lpipes status`` shows) and ``GET /openapi.json`` (the OpenAPI
document of all of these, :mod:`lpipes.api.openapi`). Generation runs on the
:class:`~lpipes.generation.engine.Engine`'s worker thread with continuous batching; events
reach the event loop through ``call_soon_threadsafe``. A client that disconnects or stops
reading has its requests cancelled and their KV blocks freed at the next step.

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``:
400 for invalid parameters and context overflows, 401 for a missing or wrong API key,
404 for an unknown model or path, 405 for a wrong method, 408 for a body that does not arrive
in time, 413 for an oversized body, 503 with ``Retry-After`` when the server is at capacity.
``docs/api.md`` lists what is honoured and what is not.

Hostile input is refused as early as it can be: the body size from ``Content-Length`` before
reading (and again while reading a chunked body), the prompt's length right after tokenization and
before the engine's queue (:class:`~lpipes.api.limits.RequestLimits`). Slow and stuck connections
are handled below the application (:mod:`lpipes.api.connections`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lpipes import __version__
from lpipes.api.limits import RequestLimits
from lpipes.api.metrics import Metrics
from lpipes.api.openapi import openapi_document
from lpipes.errors import ContextLengthError, LpipesError, NetworkError
from lpipes.generation.engine import Engine, EngineBusyError, RequestCancelled, RequestTooLargeError
from lpipes.generation.loop import GenerationRequest, TokenEvent
from lpipes.generation.sampling import SamplingParams, SamplingParamsError

log = logging.getLogger(__name__)

MAX_N = 16
MAX_LOGPROBS = 20
#: Bodies from this size on are tokenized on the service's tokenizer thread, not on the event loop:
#: a 2 MiB prompt takes seconds to tokenize, and every stream would stall meanwhile.
TOKENIZE_INLINE_BYTES = 16 << 10


# --------------------------------------------------------------------------- request models
# Strict: a string is not a number and true is not 1. OpenAI's API refuses such values too, and the
# OpenAPI document (generated from these models) can then say exactly what is accepted.


def _whole_number(value: Any) -> Any:
    # JSON Schema's "integer" is any number without a fractional part: 16.0 is one, so it is accepted.
    # Only where a double is exact: the JSON parser reads integers past 64 bits as doubles, and
    # -(2**63) - 1 would round to -(2**63) and pass a bound it is outside of.
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


#: Makes an integer field accept a float with no fractional part (``n: 2.0``). It goes after the
#: field's constraints (``Annotated[int, Field(ge=1), WHOLE]``): placed before them, pydantic would
#: write them into the JSON schema as unknown keywords (``ge``) instead of ``minimum``.
WHOLE = BeforeValidator(_whole_number)
Int = Annotated[int, WHOLE]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


_SEED_MAX = 2**63 - 1 - MAX_N  # choice i samples with seed + i


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI clients send explicit nulls for unset fields; they mean "the default".
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Annotated[int, Field(ge=-(2**63), le=_SEED_MAX), WHOLE] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0), WHOLE]] | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), WHOLE] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0), WHOLE] = 0


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    echo: bool = False
    suffix: str | None = None


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        _error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status, headers=exc.headers
    )


def _busy(exc: EngineBusyError) -> ApiError:
    return ApiError(
        503,
        str(exc),
        kind="service_unavailable",
        code="server_busy",
        headers={"Retry-After": str(exc.retry_after_s)},
    )


# --------------------------------------------------------------------------------- service
@dataclass
class NodeInfo:
    """What ``/lpipes/status`` reports besides live counters."""

    node_id: str = "local"
    source: str = ""
    executors: list[str] = field(default_factory=list)


class Service:
    """The model behind the API: the engine, its name, metrics, the accepted API keys and the request
    limits."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        *,
        info: NodeInfo | None = None,
        api_keys: Sequence[str] = (),
        limits: RequestLimits | None = None,
    ) -> None:
        self.engine = engine
        self.generator = engine.generator
        self.end_model = engine.generator.end_model
        self.model_name = model_name
        self.info = info or NodeInfo()
        self.api_keys = [k.encode() for k in api_keys]
        self.limits = limits or RequestLimits()
        self.started = time.time()
        self.stage_labels = [f"{s.start}-{s.end}" for s in self.generator.stages]
        self.metrics = Metrics(engine, self.stage_labels)
        # One thread: large prompts are tokenized one at a time, off the event loop (the tokenizer
        # releases the GIL while it works). Only encoding runs here, never a change of the
        # tokenizer's settings, so the engine thread's concurrent decoding is safe.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="lpipes-tokenize")

    async def tokenize(self, size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` inline for small inputs (``size`` bytes of request body), else on the
        tokenizer thread so that the event loop keeps serving while a large prompt is encoded."""
        if size < TOKENIZE_INLINE_BYTES:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    # ---------------------------------------------------------------- helpers
    def check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip().encode()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given, k) for k in self.api_keys)
        if not ok:
            raise ApiError(
                401,
                "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def check_prompt(self, prompt_len: int, param: str) -> None:
        """Refuse a prompt this server will never run (400 ``context_length_exceeded``), before it reaches
        the engine's queue: over ``max_prompt_tokens``, or leaving no room in the context length for a
        single new token."""
        cap = self.limits.max_prompt_tokens
        if cap and prompt_len > cap:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens, over this server's limit of {cap} prompt tokens "
                "([api] max_prompt_tokens); shorten it",
                param=param,
                code="context_length_exceeded",
            )
        ctx = self.engine.context_length
        if ctx and prompt_len >= ctx:
            raise ApiError(
                400,
                f"this server's context length is {ctx} tokens, but the prompt has {prompt_len}: it must "
                "leave room for at least one new token",
                param=param,
                code="context_length_exceeded",
            )

    def max_new_tokens(self, req: _Common, prompt_len: int) -> int:
        """The request's ``max_completion_tokens`` (or ``max_tokens``), at most ``[api] max_new_tokens``;
        without either, the cap or what the context leaves after the prompt, whichever is less."""
        cap = self.limits.max_new_tokens
        key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if asked is not None:
            if cap and asked > cap:
                raise ApiError(
                    400,
                    f"{key} is {asked}, over this server's limit of {cap} new tokens per request "
                    "([api] max_new_tokens)",
                    param=key,
                )
            return asked
        ctx = self.engine.context_length
        room = ctx - prompt_len if ctx else 0
        bounds = [b for b in (cap, room) if b > 0]
        return min(bounds) if bounds else 256

    def params(self, req: _Common, prompt_len: int, logprobs: int | None) -> SamplingParams:
        """The sampling parameters of a request whose prompt (``prompt_len`` tokens) passed
        :meth:`check_prompt`; raises :class:`ApiError` (400) for what the engine cannot do."""
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(
                400, "response_format: only {'type': 'text'} is supported", param="response_format"
            )
        if any(t >= self.end_model.vocab_size for t in req.stop_token_ids or ()):
            raise ApiError(
                400, f"stop_token_ids must be in [0, {self.end_model.vocab_size})", param="stop_token_ids"
            )
        max_tokens = self.max_new_tokens(req, prompt_len)
        try:
            return SamplingParams(
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                seed=req.seed,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=tuple([req.stop] if isinstance(req.stop, str) else (req.stop or ())),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
            )
        except SamplingParamsError as exc:
            field_name = str(exc).split(" ", 1)[0]
            raise ApiError(
                400, str(exc), param=field_name if field_name in type(req).model_fields else None
            ) from None

    async def events(
        self, requests: list[GenerationRequest], prompt_param: str = "prompt"
    ) -> AsyncIterator[TokenEvent]:
        """Submit requests and yield their events as produced; cancels what is left if the consumer stops."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def deliver(item: TokenEvent | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        try:
            self.engine.submit(requests, deliver)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded") from None
        except RequestTooLargeError as exc:
            raise ApiError(400, str(exc), param="n") from None
        except EngineBusyError as exc:
            raise _busy(exc) from None
        remaining = {r.request_id for r in requests}
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining.discard(item.request_id)
                yield item
        finally:
            if remaining:
                self.engine.cancel(list(remaining))

    def status(self) -> dict[str, Any]:
        em = self.end_model
        stages = []
        caches = {id(s): getattr(s, "cache", None) for s in self.generator.stages}
        for s, executor in zip(self.generator.stages, self.info.executors or ["?"] * len(self.stage_labels)):
            c = caches[id(s)]
            stages.append(
                {
                    "layers": [s.start, s.end],
                    "executor": executor,
                    "kv_blocks_used": getattr(c, "blocks_used", 0),
                    "kv_blocks_total": getattr(c, "blocks_total", 0),
                    "kv_block_size": getattr(c, "block_size", 0),
                    "kv_block_bytes": getattr(c, "block_bytes", 0),
                    "sessions": len(getattr(c, "sessions", [])),
                }
            )
        st = self.engine.stats
        return {
            "node_id": self.info.node_id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "model": {
                "name": self.model_name,
                "source": self.info.source,
                "num_layers": em.num_layers,
                "context_length": self.engine.context_length,
                "end_model": True,
                "dtype": str(em.dtype).removeprefix("torch."),
            },
            "stages": stages,
            "requests": {"active": st.active, "queued": st.queued, "served": st.served},
            "engine": {
                "steps": st.steps,
                "tokens_generated": st.tokens_generated,
                "max_batch_seen": max(st.batch_sizes, default=0),
                "preempted": st.preempted,
                "failovers": st.failovers,
                "max_batch_size": self.engine.max_batch_size,
                "max_batch_tokens": self.engine.max_batch_tokens,
                "prefill_chunk_tokens": self.engine.prefill_chunk_tokens,
            },
        }


# ------------------------------------------------------------------------------- responses
def _token_text(tok: Any, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte → printable-character table used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(tok: Any, token: int) -> list[int]:
    """The token's own UTF-8 bytes, also for a token holding part of a multi-byte character (whose
    decoded text is only U+FFFD): read from the byte-level BPE piece or a ``<0xNN>`` byte-fallback piece."""
    text = _token_text(tok, token)
    if "\ufffd" in text:
        piece = tok.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if m := _BYTE_FALLBACK.fullmatch(piece):
                return [int(m.group(1), 16)]
            table = _byte_level_decoder()
            if piece and all(c in table for c in piece):
                return [table[c] for c in piece]
    return list(text.encode())


class _Choice:
    """Accumulates one choice's text, tokens and logprobs."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.n = 0
        self.finish: str | None = None
        self.logprobs: list[dict[str, Any]] = []


def _chat_logprob_entry(tok: Any, ev: TokenEvent) -> dict[str, Any]:
    def one(t: int, lp: float) -> dict[str, Any]:
        return {"token": _token_text(tok, t), "logprob": lp, "bytes": _token_bytes(tok, t)}

    return {**one(ev.token, ev.logprob), "top_logprobs": [one(t, lp) for t, lp in ev.top_logprobs]}


def _completion_logprobs(tok: Any, events: list[TokenEvent], offset0: int = 0) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    offset = offset0
    for ev in events:
        s = _token_text(tok, ev.token)
        tokens.append(s)
        lps.append(ev.logprob)
        tops.append({_token_text(tok, t): lp for t, lp in ev.top_logprobs})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def build_app(service: Service) -> Starlette:
    em = service.end_model
    tok = em.tokenizer
    m = service.metrics

    limits = service.limits
    # Sent with the refusals that leave part of a request unread: the connection cannot carry another.
    close = {"Connection": "close"}

    def too_large(what: str) -> ApiError:
        return ApiError(
            413,
            f"request body {what} this server's limit of {limits.max_body_bytes} bytes "
            "([api] max_body_bytes)",
            code="request_too_large",
            headers=close,
        )

    async def read_body(request: Request) -> bytearray:
        """The body, refused (413) as soon as it is known to be too large: from Content-Length before
        a byte is read, else once the chunks read so far exceed the limit."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise too_large(f"of {int(length)} bytes (Content-Length) exceeds")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise too_large("exceeds")
        return body

    async def read_json(request: Request) -> Any:
        # A client trickling its body holds a connection and a buffer; it gets body_timeout_s in all.
        try:
            body = await asyncio.wait_for(read_body(request), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {limits.body_timeout_s:g} s ([api] body_timeout_s)",
                code="request_timeout",
                headers=close,
            ) from None
        request.state.body_bytes = len(body)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None

    async def parse(request: Request, cls: type[BaseModel]) -> Any:
        data = await read_json(request)
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            parsed = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{loc}: {first['msg']}", param=loc or None) from None
        if parsed.model != service.model_name:
            raise ApiError(
                404,
                f"model {parsed.model!r} does not exist; this server has {service.model_name!r}",
                kind="not_found_error",
                param="model",
                code="model_not_found",
            )
        if parsed.stream_options is not None and not parsed.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        return parsed

    def make_requests(
        req: _Common, prompts: list[list[int]], prefix: str, logprobs: int | None
    ) -> list[GenerationRequest]:
        rid = prefix + uuid.uuid4().hex
        out = []
        prompt_param = "messages" if prefix.startswith("chat") else "prompt"
        for p_idx, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, "the prompt is empty: it must contain at least one token", param="prompt")
            service.check_prompt(len(ids), prompt_param)  # its length first: cheap, and refuses early
            if any(not 0 <= t < em.vocab_size for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {em.vocab_size})", param="prompt")
            params = service.params(req, len(ids), logprobs)
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + i
                choice_params = params if i == 0 else _with_seed(params, seed)
                out.append(GenerationRequest(ids, choice_params, request_id=f"{rid}-{p_idx * req.n + i}"))
        return out

    async def next_event(stream: AsyncIterator[TokenEvent]) -> TokenEvent | None:
        """The next event, or None at the end; a failure of generation becomes its :class:`ApiError`."""
        try:
            return await anext(stream, None)
        except ApiError:
            raise
        except RequestCancelled:
            raise _busy(EngineBusyError("the server is shutting down", retry_after_s=5)) from None
        except NetworkError as exc:
            raise ApiError(
                503,
                f"the peer network cannot serve this request: {exc}",
                kind="service_unavailable",
                code="peer_network_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {exc}", kind="server_error") from None

    async def disconnected(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def unless_disconnected(request: Request, work: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``work`` until it ends or the client goes away (Starlette does not notice that while a
        handler runs); returns its finished task, cancelled if the client left."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, gone, return_exceptions=True)
        return task

    async def respond(
        request: Request, req: _Common, prompts: list[list[int]], chat: bool, logprobs: int | None
    ) -> Response:
        arrived = time.perf_counter()
        requests = make_requests(req, prompts, "chatcmpl-" if chat else "cmpl-", logprobs)
        base_id = requests[0].request_id.rsplit("-", 1)[0]
        index = {r.request_id: i for i, r in enumerate(requests)}
        prompt_tokens = sum(len(p) for p in prompts)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        want_lp = logprobs is not None
        choices = [_Choice() for _ in requests]
        last_at: dict[str, float] = {}

        def observe(ev: TokenEvent) -> None:
            now = time.perf_counter()
            prev = last_at.get(ev.request_id)
            (m.ttft.observe(now - arrived) if prev is None else m.itl.observe(now - prev))
            last_at[ev.request_id] = now
            m.generation_tokens.inc()
            if ev.finish_reason is not None:
                m.e2e.observe(now - arrived)

        def usage() -> dict[str, int]:
            n = sum(c.n for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        stream = service.events(requests, "messages" if chat else "prompt")
        # Wait for the first token before answering, so that a refusal (capacity, a failed prefill)
        # is still a proper HTTP error and not a broken stream.
        # A client that leaves while its request waits in the queue or prefills gives up its place.
        try:
            waiting = await unless_disconnected(request, next_event(stream))
            if waiting.cancelled():
                await stream.aclose()
                return Response(status_code=499)
            first = waiting.result()
        except BaseException:
            await stream.aclose()
            raise
        m.prompt_tokens.inc(prompt_tokens)

        if not req.stream:

            async def collect() -> None:
                ev: TokenEvent | None = first
                while ev is not None:
                    observe(ev)
                    c = choices[index[ev.request_id]]
                    c.text.append(ev.text)
                    c.n += 1
                    c.finish = ev.finish_reason or c.finish
                    if want_lp:
                        c.logprobs.append(ev)
                    ev = await next_event(stream)

            try:
                work = await unless_disconnected(request, collect())
            finally:
                await stream.aclose()
            if work.cancelled():
                return Response(status_code=499)  # nobody is listening any more
            work.result()  # re-raises a generation error as its HTTP error
            out = []
            for i, c in enumerate(choices):
                content = "".join(c.text)
                item: dict[str, Any] = {"index": i, "finish_reason": c.finish or "length", "logprobs": None}
                if chat:
                    item["message"] = {"role": "assistant", "content": content}
                    if want_lp:
                        item["logprobs"] = {"content": [_chat_logprob_entry(tok, e) for e in c.logprobs]}
                else:
                    item["text"] = content
                    if want_lp:
                        item["logprobs"] = _completion_logprobs(tok, c.logprobs)
                out.append(item)
            body = {
                "id": base_id,
                "object": obj,
                "created": created,
                "model": service.model_name,
                "choices": out,
                "usage": usage(),
            }
            return Response(orjson.dumps(body), media_type="application/json")

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        base = {
            "id": base_id,
            "object": obj + (".chunk" if chat else ""),
            "created": created,
            "model": service.model_name,
        }

        def chunk(choice_list: list[dict[str, Any]]) -> bytes:
            body = {**base, "choices": choice_list}
            if include_usage:
                body["usage"] = None
            return b"data: " + orjson.dumps(body) + b"\n\n"

        async def sse() -> AsyncIterator[bytes]:
            try:
                if chat:
                    yield chunk(
                        [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            for i in range(len(requests))
                        ]
                    )
                ev: TokenEvent | None = first
                offsets = [0] * len(requests)
                while ev is not None:
                    observe(ev)
                    i = index[ev.request_id]
                    choices[i].n += 1
                    if chat:
                        item: dict[str, Any] = {
                            "index": i,
                            "delta": {"content": ev.text} if ev.text else {},
                            "finish_reason": ev.finish_reason,
                            "logprobs": {"content": [_chat_logprob_entry(tok, ev)]} if want_lp else None,
                        }
                    else:
                        item = {
                            "index": i,
                            "text": ev.text,
                            "finish_reason": ev.finish_reason,
                            "logprobs": _completion_logprobs(tok, [ev], offsets[i]) if want_lp else None,
                        }
                        offsets[i] += len(_token_text(tok, ev.token)) if want_lp else 0
                    yield chunk([item])
                    try:
                        ev = await next_event(stream)
                    except ApiError as exc:
                        err = _error_body(exc.message, exc.kind, exc.param, exc.code)
                        yield b"data: " + orjson.dumps(err) + b"\n\n"
                        break
                if include_usage:
                    yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage()}) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                await stream.aclose()  # a client that went away cancels its requests here

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def guarded(handler: Any, endpoint_name: str, auth: bool = True) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    service.check_key(request)
                response = await handler(request)
            except ApiError as exc:
                response = _error(exc)
            except EngineBusyError as exc:
                response = _error(_busy(exc))
            except LpipesError as exc:
                response = _error(ApiError(400, str(exc)))
            except Exception as exc:  # noqa: BLE001 - never a bare 500 page
                log.exception("unexpected error in %s", endpoint_name)
                response = _error(ApiError(500, f"internal error: {exc}", kind="server_error"))
            if request.method == "POST" and not hasattr(request.state, "body_bytes"):
                # Refused before its body was read (a wrong key, a too-large body): the rest of the body
                # would only be read and thrown away, so the connection ends with this response.
                response.headers["Connection"] = "close"
            m.requests.labels(endpoint_name, str(response.status_code)).inc()
            return response

        return endpoint

    def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
        messages = []
        for i, msg in enumerate(req.messages):
            d = msg.model_dump(exclude_none=True)
            if isinstance(msg.content, list):
                texts = []
                for part in msg.content:
                    kind = part.get("type")
                    if kind not in ("text", "input_text"):
                        raise ApiError(
                            400,
                            f"messages[{i}].content: this model takes text only; got a {kind!r} part",
                            param=f"messages.{i}.content",
                        )
                    if not isinstance(part.get("text"), str):
                        raise ApiError(
                            400,
                            f"messages[{i}].content: a {kind!r} part needs a string 'text'",
                            param=f"messages.{i}.content",
                        )
                    texts.append(part["text"])
                d["content"] = "".join(texts)
            messages.append(d)
        return messages

    async def chat(request: Request) -> Response:
        req: ChatRequest = await parse(request, ChatRequest)
        if req.tool_choice not in (None, "none", "auto"):
            raise ApiError(
                400,
                "tool_choice: only 'none' and 'auto' are supported (tool calls are not forced or parsed)",
                param="tool_choice",
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        messages = chat_messages(req)
        try:
            ids = await service.tokenize(request.state.body_bytes, em.encode_chat, messages, tools=req.tools)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors are the client's
            raise ApiError(
                400, f"cannot render the chat template for these messages: {exc}", param="messages"
            ) from None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await respond(request, req, [ids], chat=True, logprobs=logprobs)

    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        p = req.prompt
        texts: list[str] | None = None
        if isinstance(p, str):
            texts = [p]
        elif p and all(isinstance(x, str) for x in p):
            texts = list(p)  # type: ignore[arg-type]
        if texts is not None:
            count = len(texts)
        else:
            count = len(p) if p and all(isinstance(x, list) for x in p) else 1
        if count * req.n > MAX_N * 4:  # counted before anything is tokenized
            raise ApiError(400, f"at most {MAX_N * 4} completions per request", param="prompt")
        if texts is not None:
            prompts = await service.tokenize(
                request.state.body_bytes, lambda: [em.encode_prompt(x) for x in texts]
            )
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        else:
            prompts = [list(p)]  # type: ignore[arg-type]
        return await respond(request, req, prompts, chat=False, logprobs=req.logprobs)

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": service.model_name,
                        "object": "model",
                        "created": int(service.started),
                        "owned_by": "lpipes",
                        "max_model_len": service.engine.context_length,
                    }
                ],
            }
        )

    async def health(request: Request) -> Response:
        if not service.engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def status(request: Request) -> Response:
        return Response(orjson.dumps(service.status()), media_type="application/json")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    schema = orjson.dumps(
        openapi_document(service.model_name, service.limits, auth=bool(service.api_keys), version=__version__)
    )

    async def openapi(request: Request) -> Response:
        return Response(schema, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (no such path) and 405 (wrong method) in the JSON error shape, so that a
        client sees one error format from every URL of the server."""
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = (
            f"no such endpoint: {request.method} {request.url.path}"
            if exc.status_code == 404
            else f"{request.method} is not allowed on {request.url.path}"
        )
        return _error(ApiError(exc.status_code, message, kind=kind, headers=exc.headers))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/lpipes/status", guarded(status, "status"), methods=["GET"]),
            Route("/v1/models", guarded(models, "models"), methods=["GET"]),
            Route("/v1/chat/completions", guarded(chat, "chat"), methods=["POST"]),
            Route("/v1/completions", guarded(completions, "completions"), methods=["POST"]),
        ],
        exception_handlers={404: http_error, 405: http_error},
        lifespan=lifespan,
    )


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)

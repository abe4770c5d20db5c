"""OpenAI-compatible HTTP API on one node (first increment: completions and chat, streaming or not).

Generation runs on a worker thread (the kernels release the GIL); events reach the event loop
through an asyncio queue. One generation runs at a time for now (batching comes with the
scheduler). A client that disconnects mid-stream stops its generation and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lpipes.errors import ContextLengthError, LpipesError
from lpipes.generation.loop import GenerationRequest, Generator, TokenEvent
from lpipes.generation.sampling import SamplingParams, SamplingParamsError


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0


class ChatRequest(_Common):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[int]


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class Service:
    """Holds the generator and serialises generations onto a worker thread."""

    def __init__(self, generator: Generator, model_name: str, default_max_tokens: int = 256) -> None:
        self.generator = generator
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()

    def params(self, req: _Common) -> SamplingParams:
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            ctx = self.generator.end_model.context_length
            max_tokens = self.default_max_tokens if not ctx else min(self.default_max_tokens, ctx)
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
                ignore_eos=req.ignore_eos,
            )
        except SamplingParamsError as exc:
            raise ApiError(400, str(exc)) from None

    async def run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield the request's token events; stops the generation if the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def work() -> None:
            try:
                with self._lock:
                    events = self.generator.generate([request])
                    try:
                        for ev in events:
                            loop.call_soon_threadsafe(queue.put_nowait, ev)
                            if cancelled.is_set():
                                break
                    finally:
                        events.close()  # frees the session's KV blocks on every stage
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        thread = threading.Thread(target=work, name=f"gen-{request.request_id}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()


def build_app(service: Service) -> Starlette:
    tok = service.generator.end_model

    async def parse(request: Request, cls: type[BaseModel]) -> Any:
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
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
            )
        return parsed

    async def respond(req: _Common, prompt_ids: list[int], chat: bool) -> Response:
        params = service.params(req)
        gen_req = GenerationRequest(
            prompt_ids, params, request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        )
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        try:
            service.generator.check_request(gen_req)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="messages" if chat else "prompt") from None

        def usage(n: int) -> dict[str, int]:
            return {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": n,
                "total_tokens": len(prompt_ids) + n,
            }

        if not req.stream:
            text, n, finish = [], 0, "length"
            async for ev in service.run(gen_req):
                text.append(ev.text)
                n += 1
                finish = ev.finish_reason or finish
            content = "".join(text)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": content}
            else:
                choice["text"] = content
            return JSONResponse(
                {
                    "id": gen_req.request_id,
                    "object": obj,
                    "created": created,
                    "model": service.model_name,
                    "choices": [choice],
                    "usage": usage(n),
                }
            )

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def sse() -> AsyncIterator[bytes]:
            base = {
                "id": gen_req.request_id,
                "object": obj + (".chunk" if chat else ""),
                "created": created,
                "model": service.model_name,
            }
            n = 0
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield b"data: " + orjson.dumps({**base, "choices": [first]}) + b"\n\n"
            async for ev in service.run(gen_req):
                n += 1
                if chat:
                    choice = {
                        "index": 0,
                        "delta": {"content": ev.text} if ev.text else {},
                        "finish_reason": ev.finish_reason,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": ev.text,
                        "finish_reason": ev.finish_reason,
                        "logprobs": None,
                    }
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            if include_usage:
                yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage(n)}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return _error(exc.status, exc.message, exc.kind, exc.param)
            except LpipesError as exc:
                return _error(400, str(exc))

        return endpoint

    async def chat(request: Request) -> Response:
        req: ChatRequest = await parse(request, ChatRequest)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            ids = tok.encode_chat(messages)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's
            raise ApiError(
                400, f"cannot render the chat template for these messages: {exc}", param="messages"
            ) from None
        return await respond(req, ids, chat=True)

    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        ids = req.prompt if isinstance(req.prompt, list) else tok.encode_prompt(req.prompt)
        return await respond(req, list(ids), chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "lpipes"}],
            }
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
            Route("/v1/completions", guarded(completions), methods=["POST"]),
        ]
    )

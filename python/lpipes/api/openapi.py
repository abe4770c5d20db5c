"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

The request bodies are generated from the pydantic models that validate them (``ChatRequest``,
``CompletionRequest`` in ``server.py``), so the document cannot drift from what the server accepts;
the responses are written out here, one per status the server really gives, in the shapes
``server.py`` builds. The document is per server: ``model`` is the one model it serves, the
``max_tokens`` bounds are its ``[api] max_new_tokens``, and the bearer scheme is listed only when
``api_keys`` are configured. Tests (``tests/integration/test_api_schema.py``) run schemathesis against
a live server with it.
"""

from __future__ import annotations

import copy
from typing import Any

from lpipes.api.limits import RequestLimits

_NULL = {"type": "null"}


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """``prop`` also accepting ``null``: the server reads an explicit null as "the default"."""
    options = prop.get("anyOf")
    if prop == {} or (options is not None and _NULL in options):
        return prop
    outer = {k: prop[k] for k in ("title", "default", "description") if k in prop}
    inner = {k: v for k, v in prop.items() if k not in outer}
    return {**outer, "anyOf": [*(options or [inner]), _NULL]}


def _request_schemas(model_name: str, limits: RequestLimits) -> dict[str, Any]:
    from lpipes.api.server import ChatRequest, CompletionRequest

    out: dict[str, Any] = {}
    for cls in (ChatRequest, CompletionRequest):
        schema = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        required = set(schema.get("required", []))
        props = schema["properties"]
        for name, prop in list(props.items()):
            if name not in required:
                props[name] = _nullable(prop)
        props["model"] = {
            "type": "string",
            "enum": [model_name],
            "description": "the model this server serves; any other name answers 404",
        }
        if limits.max_new_tokens:
            for key in ("max_tokens", "max_completion_tokens"):
                for option in props[key]["anyOf"]:
                    if option.get("type") == "integer":
                        option["maximum"] = limits.max_new_tokens
        out[cls.__name__] = schema
    return out


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {
    "Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait before retrying"}
}
_INT = {"type": "integer"}
_STR = {"type": "string"}


def _completion(kind: str, field: str, field_schema: dict[str, Any]) -> dict[str, Any]:
    """A (chat) completion response: ``object`` = ``kind``, each choice's output in ``field``."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": _STR,
            "object": {"const": kind},
            "created": _INT,
            "model": _STR,
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", field, "finish_reason", "logprobs"],
                    "properties": {
                        "index": _INT,
                        field: field_schema,
                        "finish_reason": _STR,
                        "logprobs": {"type": ["object", "null"]},
                    },
                },
            },
            "usage": {"$ref": "#/components/schemas/Usage"},
        },
    }


_RESPONSE_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": _STR,
                    "type": _STR,
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
    },
    "ChatCompletion": _completion(
        "chat.completion",
        "message",
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"const": "assistant"}, "content": _STR},
        },
    ),
    "Completion": _completion("text_completion", "text", _STR),
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by", "max_model_len"],
                    "properties": {
                        "id": _STR,
                        "object": {"const": "model"},
                        "created": _INT,
                        "owned_by": _STR,
                        "max_model_len": _INT,
                    },
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": ["ok", "unavailable"]}},
    },
    "Status": {
        "type": "object",
        "required": ["node_id", "version", "uptime_s", "model", "stages", "requests", "engine"],
        "properties": {
            "node_id": _STR,
            "version": _STR,
            "uptime_s": {"type": "number"},
            "model": {"type": "object", "required": ["name", "context_length"]},
            "stages": {"type": "array", "items": {"type": "object"}},
            "requests": {
                "type": "object",
                "required": ["active", "queued", "served"],
                "properties": {"active": _INT, "queued": _INT, "served": _INT},
            },
            "engine": {"type": "object"},
        },
    },
}


def _generation(summary: str, body: str, result: str, limits: RequestLimits, auth: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": "the completion; with `stream: true` a server-sent event stream of chunks "
            'ending in `data: [DONE]` (an error after the first chunk arrives as a `data: {"error": …}` '
            "event)",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{result}"}},
                "text/event-stream": {"schema": _STR},
            },
        },
        "400": _error(
            "invalid JSON or field values, an unsupported field, a prompt over the context length or "
            "`max_prompt_tokens` (`code: context_length_exceeded`), `max_tokens` over `max_new_tokens`"
        ),
        "404": _error("`model` is not this server's model (`code: model_not_found`)"),
        "408": _error(
            f"the body did not arrive within `body_timeout_s` ({limits.body_timeout_s:g} s; "
            "`code: request_timeout`); the connection is closed"
        ),
        "413": _error(
            f"the body is over `max_body_bytes` ({limits.max_body_bytes} bytes; `code: request_too_large`), "
            "refused from Content-Length before it is read; the connection is closed"
        ),
        "500": _error("the generation failed (`type: server_error`): a fault of the server, not the request"),
        "503": _error(
            "at capacity (`code: server_busy`), the layer peers cannot serve (`peer_network_unavailable`) "
            "or the server is shutting down",
            _RETRY_AFTER,
        ),
    }
    op: dict[str, Any] = {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        },
        "responses": responses,
    }
    return _with_auth(op, auth)


def _with_auth(op: dict[str, Any], auth: bool) -> dict[str, Any]:
    if auth:
        op["security"] = [{"bearer": []}]
        op["responses"]["401"] = _error("missing or wrong API key (`code: invalid_api_key`)")
    return op


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def openapi_document(model_name: str, limits: RequestLimits, *, auth: bool, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a server serving ``model_name`` with these limits; ``auth``: whether
    ``api_keys`` are configured (the bearer scheme and the 401 responses are listed only then)."""
    open_op = {"security": []} if auth else {}
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": _generation(
                "Chat completion (messages rendered with the model's chat template)",
                "ChatRequest",
                "ChatCompletion",
                limits,
                auth,
            )
        },
        "/v1/completions": {
            "post": _generation(
                "Text completion of a raw prompt (text or token ids)",
                "CompletionRequest",
                "Completion",
                limits,
                auth,
            )
        },
        "/v1/models": {
            "get": _with_auth(
                {"summary": "The one model this server serves", "responses": {"200": _json("ModelList", "")}},
                auth,
            )
        },
        "/lpipes/status": {
            "get": _with_auth(
                {
                    "summary": "Node, model, KV cache and request counts (what `lpipes status` shows)",
                    "responses": {"200": _json("Status", "")},
                },
                auth,
            )
        },
        "/health": {
            "get": {
                **open_op,
                "summary": "Liveness for load balancers (never needs a key)",
                "responses": {
                    "200": _json("Health", "the engine runs"),
                    "503": {**_json("Health", "the engine has stopped"), "headers": _RETRY_AFTER},
                },
            }
        },
        "/metrics": {
            "get": {
                **open_op,
                "summary": "Prometheus metrics (never needs a key)",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": _STR}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                **open_op,
                "summary": "This document (never needs a key)",
                "responses": {"200": {"description": "", "content": {"application/json": {"schema": {}}}}},
            }
        },
    }
    for item in paths.values():
        for op in item.values():
            for response in op["responses"].values():
                response["description"] = response["description"] or "success"
    components: dict[str, Any] = {
        "schemas": {**copy.deepcopy(_RESPONSE_SCHEMAS), **_request_schemas(model_name, limits)}
    }
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lpipes OpenAI-compatible API",
            "version": version,
            "description": "See docs/api.md. Limits of this server: "
            f"max_body_bytes {limits.max_body_bytes}, max_new_tokens {limits.max_new_tokens or 'none'}, "
            f"max_prompt_tokens {limits.max_prompt_tokens or 'the context length'}.",
        },
        "paths": paths,
        "components": components,
    }

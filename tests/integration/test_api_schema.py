"""The HTTP API against its own OpenAPI document (``GET /openapi.json``), fuzzed by schemathesis.

A real ``lpipes serve`` (tiny random-weight model) answers requests that schemathesis generates from
the document: valid ones (which run generations) and invalid ones (wrong types, out-of-range values,
missing fields). Every response must be a documented status with a documented content type and,
outside streams, body shape; invalid input must get a 4xx, never a 5xx; the server must still be
healthy afterwards. The default run is bounded to fit CI; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

# Short generations keep every valid request cheap; the cap is in the document (max_tokens maximum).
SERVER = "max_new_tokens = 2\n"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZ = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None, "derandomize": True}


@pytest.fixture(scope="module")
def schema_server(start_server):
    return start_server(api_extra=SERVER)


@pytest.fixture(scope="module")
def api_schema(schema_server):
    loaded = schemathesis.openapi.from_url(schema_server.base + "/openapi.json", timeout=30)
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


def _call_and_check(case, base: str) -> None:
    response = case.call(base_url=base, timeout=60)
    # An SSE stream is one string to the document; its events are checked by test_api*.py. The no-5xx,
    # status and content-type checks still apply to it.
    streamed = any(v.startswith("text/event-stream") for v in response.headers.get("content-type", []))
    case.validate_response(
        response, checks=CHECKS, excluded_checks=[response_schema_conformance] if streamed else []
    )


@schema.parametrize()
@settings(max_examples=20, **FUZZ)
def test_api_conforms_to_its_openapi_document(case, schema_server):
    _call_and_check(case, schema_server.base)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=400, **FUZZ)
def test_api_conforms_to_its_openapi_document_long(case, schema_server):
    _call_and_check(case, schema_server.base)


def test_server_is_healthy_after_fuzzing(schema_server):
    base = schema_server.base
    assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    status = httpx.get(base + "/lpipes/status", timeout=10).json()
    assert status["requests"]["active"] == 0 and status["requests"]["queued"] == 0
    assert all(stage["kv_blocks_used"] == 0 for stage in status["stages"])
    reply = httpx.post(
        base + "/v1/completions",
        json={"model": schema_server.model, "prompt": "still here", "max_tokens": 2, "ignore_eos": True},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_openapi_document_describes_every_route(schema_server):
    raw = httpx.get(schema_server.base + "/openapi.json", timeout=10)
    doc = raw.json()
    assert doc["openapi"].startswith("3.1")
    # Constraints are JSON Schema keywords; pydantic writes ge/le instead if an integer's validators are
    # in the wrong order, and the fuzzer would then not know the bounds.
    assert b'"ge"' not in raw.content and b'"le"' not in raw.content
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert set(ops) == {
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/models", "get"),
        ("/lpipes/status", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    }
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert set(ops[path, "post"]["responses"]) == {"200", "400", "404", "408", "413", "500", "503"}
    assert "401" not in ops["/v1/models", "get"]["responses"]  # no api_keys on this server
    request = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [schema_server.model]
    assert {"type": "integer", "minimum": 1, "maximum": 2} in request["max_tokens"]["anyOf"]
    assert {"type": "null"} in request["temperature"]["anyOf"]  # null means the default


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        # A penalty this small overflowed the penalised logits to inf: a 500 "generation failed".
        ({"repetition_penalty": 1e-300}, 400, "repetition_penalty"),
        ({"repetition_penalty": 1e300}, 400, "repetition_penalty"),
        ({"n": "2"}, 400, "n"),  # strict types, as the document says
        ({"stream": 1}, 400, "stream"),
        ({"n": 2.0}, 200, None),  # a JSON Schema integer
        ({"seed": -(2**63) - 1}, 400, "seed"),  # parsed as a double, it rounded into range
        ({"top_k": 2**62}, 200, None),
        ({"top_k": 10**30}, 400, "top_k"),  # past 64 bits JSON integers are read as doubles
    ],
)
def test_edge_values_are_refused_or_served_never_a_5xx(schema_server, extra, status, param):
    body = {"model": schema_server.model, "prompt": "x", "max_tokens": 1, **extra}
    r = httpx.post(schema_server.base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == param

"""Hostile clients against a real `lpipes serve`: slow and stuck connections, too many connections,
oversized and trickled bodies, oversized prompts and generation requests, and API keys on every
endpoint. Everything talks to 127.0.0.1 with raw sockets where the point is what a well-behaved
client would never do; every socket operation has a timeout and every loop a bound.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64
BUSY_CLIENTS = 64  # clients that connect at once beyond MAX_CONNECTIONS
MAX_BODY = 64 << 10
MAX_PROMPT = 250  # the tiny model's context is 256
MAX_NEW = 200
HOSTILE = (
    f"max_connections = {MAX_CONNECTIONS}\nheader_timeout_s = {HEADER_TIMEOUT_S}\n"
    f"body_timeout_s = {BODY_TIMEOUT_S}\nsend_timeout_s = {SEND_TIMEOUT_S}\nmax_body_bytes = {MAX_BODY}\n"
    f"max_prompt_tokens = {MAX_PROMPT}\nmax_new_tokens = {MAX_NEW}\n"
)
KEYS = 'api_keys = ["sekret-1", "sekret-2"]\n'  # as in test_api_features.py: the same server is reused
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def hostile(start_server):
    return start_server(api_extra=HOSTILE)


def _addr(base: str) -> tuple[str, int]:
    url = urlsplit(base)
    assert url.hostname == "127.0.0.1" and url.port is not None
    return url.hostname, url.port


def _connect(base: str, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    if rcvbuf is not None:  # before connect, so the advertised window stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(_addr(base))
    return s


def _read_until_closed(s: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (EOF or reset): ``(data, closed)``;
    ``closed`` is False if it was still open after ``timeout_s``."""
    data = bytearray()
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(min(left, 1.0))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset: closed with data we sent still unread, or aborted
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


def _complete(base: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 2, "ignore_eos": True, **extra}
    return httpx.post(base + "/v1/completions", json=body, timeout=TIMEOUT_S)


def _status(base: str, **kw) -> dict:
    return httpx.get(base + "/lpipes/status", timeout=10, **kw).json()


# ------------------------------------------------------------------------------------- slow clients
def test_slowloris_is_cut_off_and_does_not_starve_others(hostile):
    """56 sockets trickle a request's headers a byte at a time; a normal request is still answered at
    once, and the server closes every trickling socket (408) once header_timeout_s has passed."""
    socks = [_connect(hostile.base) for _ in range(56)]
    opened = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for s in socks:
            try:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            except OSError:
                pass
        while not stop.wait(0.25):  # one more byte of a header line that never ends
            for s in socks:
                try:
                    s.send(b"z")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        reply = _complete(hostile.base, hostile.model)
        assert reply.status_code == 200 and time.monotonic() - t0 < 5
        closed, timed_out = 0, 0
        for s in socks:
            data, was_closed = _read_until_closed(s, opened + HEADER_TIMEOUT_S + 15 - time.monotonic())
            closed += was_closed
            timed_out += data.startswith(b"HTTP/1.1 408")
        elapsed = time.monotonic() - opened
        assert closed == len(socks), (
            f"{len(socks) - closed} trickling sockets still open after {elapsed:.1f} s"
        )
        assert timed_out > 0  # the ones the server closed cleanly said why
        assert elapsed >= HEADER_TIMEOUT_S - 0.5  # not before their time either
    finally:
        stop.set()
        thread.join(timeout=5)
        for s in socks:
            s.close()
    assert _complete(hostile.base, hostile.model).status_code == 200


def test_connections_beyond_max_connections_are_refused_at_once(hostile):
    socks = [_connect(hostile.base) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # every one accepted
        extra = _connect(hostile.base)
        t0 = time.monotonic()
        data, closed = _read_until_closed(extra, 5)
        extra.close()
        assert closed and time.monotonic() - t0 < 2
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "server_busy"
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10  # the server notices the closed sockets
    while _complete(hostile.base, hostile.model).status_code != 200:
        assert time.monotonic() < deadline


def test_a_client_that_sends_its_request_at_once_still_reads_the_503(hostile):
    """An HTTP client writes its request as soon as it connects. Closing a refused connection with that
    request unread would send a reset, which can destroy the 503 before the client reads it (httpx then
    raises ReadError, and the client never learns to retry): the 503 is followed by a half-close, and
    what the client sends is read and dropped until it closes."""
    socks = [_connect(hostile.base) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # every one accepted
        body = {"model": hostile.model, "prompt": "x " * 3000, "max_tokens": 4}

        async def burst() -> list[httpx.Response | BaseException]:
            # Many at once: the loop then accepts connections whose requests have already arrived.
            limits = httpx.Limits(max_connections=BUSY_CLIENTS)
            async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as http:
                posts = (http.post(hostile.base + "/v1/completions", json=body) for _ in range(BUSY_CLIENTS))
                return await asyncio.gather(*posts, return_exceptions=True)

        replies = asyncio.run(burst())
        errors = [repr(r) for r in replies if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of {BUSY_CLIENTS} clients got no reply: {errors[:3]}"
        for r in replies:
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while _complete(hostile.base, hostile.model).status_code != 200:
        assert time.monotonic() < deadline


def test_a_stream_nobody_reads_is_aborted_and_its_sequences_freed(hostile):
    """A streaming client with a tiny receive window that never reads: other requests go on, and
    after send_timeout_s with the send buffer full the server aborts the connection (the client never
    gets to the end of its stream) and cancels the generation."""
    body = json.dumps(
        {
            "model": hostile.model,
            "messages": [{"role": "user", "content": "tell me everything"}],
            "n": 16,
            "max_tokens": MAX_NEW,
            "logprobs": True,
            "top_logprobs": 20,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    stalled = _connect(hostile.base, rcvbuf=4096)
    try:
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while _status(hostile.base)["requests"]["active"] < 16:  # it runs
            assert time.monotonic() < deadline, "the stalled request never started"
            time.sleep(0.05)
        t0 = time.monotonic()
        assert _complete(hostile.base, hostile.model).status_code == 200
        assert time.monotonic() - t0 < 15
        while True:  # cancelled: its sequences and KV blocks are given back
            status = _status(hostile.base)
            if status["requests"]["active"] == 0 and all(
                st["kv_blocks_used"] == 0 for st in status["stages"]
            ):
                break
            assert time.monotonic() < deadline, f"the stalled stream still holds {status['requests']}"
            time.sleep(0.1)
        data, closed = _read_until_closed(stalled, 20)
        assert closed and data.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" not in data  # cut off, not finished
    finally:
        stalled.close()


# ---------------------------------------------------------------------------------- oversized bodies
def test_oversized_body_is_refused_from_content_length_before_reading(hostile):
    s = _connect(hostile.base)
    try:
        t0 = time.monotonic()
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n{"
        )
        data, closed = _read_until_closed(s, 10)
        assert closed and time.monotonic() - t0 < 3
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "request_too_large" and "max_body_bytes" in error["message"]
        assert str(MAX_BODY) in error["message"]
    finally:
        s.close()


def test_oversized_chunked_body_is_refused_while_reading(hostile):
    s = _connect(hostile.base)
    try:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
        for _ in range(MAX_BODY // 8192 + 2):  # just over the limit, and never the final chunk
            s.sendall(chunk)
        data, closed = _read_until_closed(s, 10)
        assert closed and data.startswith(b"HTTP/1.1 413")
    finally:
        s.close()
    r = httpx.post(hostile.base + "/v1/completions", content=b" " * (MAX_BODY + 1), timeout=TIMEOUT_S)
    assert r.status_code == 413  # what an ordinary client sees


def test_trickled_body_times_out(hostile):
    s = _connect(hostile.base)
    try:
        t0 = time.monotonic()
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        data, closed = _read_until_closed(s, BODY_TIMEOUT_S + 10)
        assert closed and BODY_TIMEOUT_S - 0.5 <= time.monotonic() - t0 < BODY_TIMEOUT_S + 5
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        s.close()


# ----------------------------------------------------------------------- prompt and generation limits
def test_oversized_prompts_are_refused_before_the_queue(hostile):
    base, model = hostile.base, hostile.model
    served = _status(base)["requests"]["served"]
    r = _complete(base, model, prompt=[5] * (MAX_PROMPT + 1))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert (
        f"limit of {MAX_PROMPT} prompt tokens" in error["message"] and "max_prompt_tokens" in error["message"]
    )
    long_text = "word " * 2000
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": long_text}], "max_tokens": 2},
        timeout=TIMEOUT_S,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = _complete(base, model, prompt=long_text)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert _status(base)["requests"]["served"] == served  # none of them reached the engine


def test_max_new_tokens_caps_and_defaults_max_tokens(hostile):
    base, model = hostile.base, hostile.model
    for key in ("max_tokens", "max_completion_tokens"):
        r = _complete(base, model, **{"max_tokens": None, key: MAX_NEW + 1})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == key and key in error["message"]
        assert f"limit of {MAX_NEW} new tokens" in error["message"] and "max_new_tokens" in error["message"]
    # Without max_tokens: what the context leaves after the prompt, as that is less than the cap here.
    r = _complete(base, model, prompt=[5] * MAX_PROMPT, max_tokens=None)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 256 - MAX_PROMPT
    assert _complete(base, model, max_tokens=MAX_NEW, prompt=[5]).status_code == 200


# ------------------------------------------------------------------------------------------ API keys
PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/lpipes/status", None),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_every_protected_endpoint_needs_the_key(start_server, method, path, body):
    served = start_server(api_extra=KEYS)
    payload = None if body is None else {"model": served.model, **body}
    for auth in (
        None,
        "Bearer wrong",
        "Bearer sekret-1x",
        "Basic sekret-1",
        "sekret-1",
        "Bearer",
        "Bearer \tsekret-1x",
    ):
        headers = {} if auth is None else {"Authorization": auth}
        r = httpx.request(method, served.base + path, json=payload, headers=headers, timeout=TIMEOUT_S)
        assert r.status_code == 401, (auth, r.status_code)
        assert r.json()["error"]["code"] == "invalid_api_key"
    for key in ("sekret-1", "sekret-2"):
        headers = {"Authorization": f"bearer {key}"}  # the scheme is case-insensitive
        r = httpx.request(method, served.base + path, json=payload, headers=headers, timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text


def test_open_endpoints_and_auth_before_body(start_server):
    served = start_server(api_extra=KEYS)
    for path in ("/health", "/metrics", "/openapi.json"):
        assert httpx.get(served.base + path, timeout=10).status_code == 200
    doc = httpx.get(served.base + "/openapi.json", timeout=10).json()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, op in (("/v1/completions", "post"), ("/v1/models", "get"), ("/lpipes/status", "get")):
        assert "401" in doc["paths"][path][op]["responses"] and doc["paths"][path][op]["security"]
    s = _connect(served.base)  # a huge body without a key is refused for the key, unread
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1073741824\r\n\r\n")
        data, _ = _read_until_closed(s, 5)
        assert data.startswith(b"HTTP/1.1 401")
    finally:
        s.close()

"""Connection-level defenses of the HTTP API against slow, stuck and too many clients.

uvicorn (0.30 and later) bounds a request's header size (h11: 16 KiB) and closes idle keep-alive
connections (``timeout_keep_alive``, 5 s), but nothing else about a connection:

* a client may take forever to send its request line and headers (a *slowloris*: a byte every few
  seconds keeps uvicorn waiting, because the keep-alive timer stops at the first byte and no header
  timer exists), so a few thousand such sockets exhaust the process's file descriptors;
* connections are accepted without limit (``limit_concurrency`` answers 503 only once a request's
  headers are in, and counts the slowloris sockets against the good clients);
* a client that stops reading a response (an SSE stream) leaves the send task waiting on the
  transport's drain forever: the request holds its connection and its task indefinitely, and its
  remaining output piles up in the server. Before that the kernel takes up to ``tcp_wmem``'s maximum
  (4 MiB by default on Linux, grown by autotuning) of unread output per connection.

:func:`guarded_protocol` closes these gaps on the connection itself, below Starlette: at most
``max_connections`` connections (one more is answered 503 before anything is read, then half-closed;
what it sends is dropped until it closes, for at most :data:`REFUSED_LINGER_S`), the
request line and headers within ``header_timeout_s`` of the connection opening or of the previous
response ending (else 408 and close), a kernel send buffer of :data:`SEND_BUFFER_BYTES`, and a
response the client leaves unread — the send buffers full — for ``send_timeout_s`` aborts the
connection; the application then sees a disconnect and cancels the request's generation
(``server.py``). So a stuck reader costs at most about 64 KiB (the transport's high-water mark) plus
the kernel buffer, for ``send_timeout_s``. The body's own deadline (``body_timeout_s``) is kept by the
application, which knows when it reads one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from lpipes.api.limits import HttpLimits

log = logging.getLogger(__name__)

#: The kernel send buffer of each API connection (fixed, which also turns off its autotuning). The API
#: sends token streams and JSON bodies of a few MiB at most; 256 KiB keeps 100 Mbit/s over a 20 ms path
#: busy, and bounds what a client that stops reading parks in the kernel (128 connections: 64 MiB, as
#: Linux doubles the value for its bookkeeping).
SEND_BUFFER_BYTES = 256 << 10

#: How long a refused connection (one beyond ``max_connections``) stays open after its 503, half-closed,
#: reading and dropping what the client sends. Closed at once, with the client's request unread, the
#: socket sends a reset instead of a FIN, and the reset can destroy the 503 before the client reads it:
#: 64 httpx clients beyond the limit all got ``ReadError`` instead of the 503 and its Retry-After. At
#: most ``max_connections`` refused connections linger at a time; beyond that they are closed at once.
REFUSED_LINGER_S = 2.0


def _raw_response(status: str, message: str, extra: str = "") -> bytes:
    body = b'{"error": {"message": "%s", "type": "%s", "param": null, "code": "%s"}}' % (
        message.encode(),
        b"service_unavailable" if status.startswith("503") else b"invalid_request_error",
        b"server_busy" if status.startswith("503") else b"request_timeout",
    )
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


_BUSY = _raw_response(
    "503 Service Unavailable", "too many connections to this server; retry shortly", "retry-after: 1\r\n"
)
_HEADER_TIMEOUT = _raw_response("408 Request Timeout", "the request headers did not arrive in time")


def guarded_protocol(
    limits: HttpLimits, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) enforcing ``limits`` per connection.

    ``base`` defaults to uvicorn's h11 protocol: h11 is always installed with uvicorn and bounds the
    header size, so the server behaves the same whether or not httptools is present.
    """
    if base is None:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    base_cls: Any = base

    class GuardedProtocol(base_cls):
        # Relies on what uvicorn's h11 and httptools protocols share: ``connections`` (the server's set
        # of open connections), ``cycle`` (the current request's cycle, replaced when a new request's
        # headers are complete) with ``response_complete``, ``on_response_complete`` and the asyncio
        # flow-control callbacks.
        _refused = False
        _lingering = 0  # refused connections of this server still open (a class counter, per server)
        _linger_timer: asyncio.TimerHandle | None = None
        _header_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _awaiting: Any = None
        _partial = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                self._refuse(transport)
                return
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            self._arm_header_timer()

        def _refuse(self, transport: Any) -> None:
            """503, then a half-close; the client's request is read and dropped until it closes (see
            :data:`REFUSED_LINGER_S`)."""
            transport.write(_BUSY)
            cls = type(self)
            if cls._lingering >= limits.max_connections or not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
            cls._lingering += 1
            self._linger_timer = self.loop.call_later(REFUSED_LINGER_S, transport.abort)

        def eof_received(self) -> bool | None:
            if self._refused:
                return False  # the client is done too: close
            return super().eof_received()  # type: ignore[no-any-return]

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._header_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._send_timer = None
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
                type(self)._lingering -= 1
            if not self._refused:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # a refused connection's request: dropped
            if self.cycle is self._awaiting:
                self._partial = True  # bytes of a request whose headers are not complete yet
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            # A new request replaces ``cycle`` once its headers are parsed; until then it is this one.
            self._awaiting = self.cycle
            self._partial = False
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            cycle = self.cycle
            if self.transport.is_closing() or cycle is not self._awaiting:
                return  # a request's headers arrived in time
            if cycle is not None and not cycle.response_complete:
                return  # a pipelined request is being answered; its end re-arms the timer
            if self._partial:  # someone is (slowly) sending a request: tell them why it ends
                self.transport.write(_HEADER_TIMEOUT)
            log.info(
                "closing an HTTP connection whose request headers took over %g s", limits.header_timeout_s
            )
            self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(limits.send_timeout_s, self._send_timeout)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_timeout(self) -> None:
            self._send_timer = None
            log.info(
                "aborting an HTTP connection whose client read nothing for %g s (its requests are cancelled)",
                limits.send_timeout_s,
            )
            # abort, not close: close would wait to flush the very buffer the client does not read.
            self.transport.abort()

    GuardedProtocol.__qualname__ = GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def server_config(app: Any, host: str, port: int, limits: HttpLimits, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` every API server of lpipes runs with: the guarded protocol, quiet logs and
    a 5 s graceful shutdown; ``kwargs`` are passed on (e.g. ``loop``)."""
    import uvicorn

    options: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 5, **kwargs}
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(limits), **options)

"""QUIC transport between peers: authenticated connections carrying frames on streams.

One connection per peer pair, reused in both directions; a stream per conversation (a session hop, a
control exchange). A node sends to a peer that connected to it over that peer's connection
(:class:`InboundConnection`, streams opened by the server side) instead of opening a second one.

On a stream, frames flow back to back (``docs/wire-format.md``); the receiver validates each header
before it allocates the frame's buffer. :class:`PeerServer` answers the frames it
receives with a handler; :class:`PeerConnection` is the client side. Every read has a timeout;
every write waits until the stream has at most ``_quic.DRAIN_BOUND_BYTES`` unsent (``_quic.drain``), so a
slow link or peer slows the writer instead of growing its queue.

The QUIC library is qh3 (see ``_quic`` for why and for the tuning): in bench/transport.py on loopback a
230-280 µs decode-step round trip and 230-265 MiB/s on 4 MiB frames, against ~820 µs and 5-15 MiB/s with
aioquic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from qh3.quic.connection import QuicConnectionError

from lpipes.errors import LpipesError
from lpipes.net import _quic
from lpipes.net.auth import (
    AuthError,
    cert_fingerprint,
    check_node_id,
    check_nonce,
    check_proof,
    new_nonce,
    proof,
    sign_identity,
    transcript,
    verify_identity,
)
from lpipes.net.tls import NodeCertificate, make_certificate
from lpipes.wire import (
    DEFAULT_LIMITS,
    HEADER_BYTES,
    Frame,
    MessageType,
    WireError,
    WireLimits,
    decode,
    encode,
    error_frame,
    frame_length,
)

log = logging.getLogger(__name__)

ALPN = "lpipes/1"
DEFAULT_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0
REFUSAL_LOG_INTERVAL_S = 60.0  # a refusal is warned of once per (host, reason) per this many seconds


class TransportError(LpipesError, ConnectionError):
    """A connection or stream failed: refused, timed out, closed, or the peer replied with an error."""


class PeerErrorReply(TransportError):
    """The peer answered with an ERROR frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer error {code}: {message}")
        self.code = code


def quic_configuration(*, is_client: bool, cert: NodeCertificate | None = None) -> Any:
    """QUIC settings tuned for tensor frames (``_quic.TUNING``; measured in bench/transport.py)."""
    cfg = _quic.QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], **_quic.TUNING)
    if cert is not None:
        cfg.load_cert_chain(cert.cert_pem, cert.key_pem)
    if is_client:
        # Peers are authenticated by the network key, bound to the certificate's fingerprint. qh3 has a
        # separate host-name switch; CERT_NONE already skips it in qh3 2.1, off anyway for the same reason.
        cfg.verify_mode = ssl.CERT_NONE
        cfg.verify_hostname = False
    return cfg


# ------------------------------------------------------------------------------------ framing
async def read_frame(
    reader: asyncio.StreamReader,
    limits: WireLimits = DEFAULT_LIMITS,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    *,
    wait: float | None | Literal["timeout"] = "timeout",
) -> Frame | None:
    """The next frame of a stream, or None at a clean end of stream.

    ``wait`` bounds the wait for the frame's header (default: ``timeout``; None: no bound, for a
    stream that may idle between frames), ``timeout`` the rest of the frame.

    Raises:
        WireError: a malformed frame (or a stream that ends inside one).
        TimeoutError: no header within ``wait`` or no whole frame within ``timeout`` seconds.
    """
    try:
        if wait is None:
            header = await reader.readexactly(HEADER_BYTES)
        else:
            async with asyncio.timeout(timeout if wait == "timeout" else wait):
                header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise WireError(f"frame: stream ended inside a header ({len(exc.partial)} bytes)") from None
    async with asyncio.timeout(timeout):
        n = frame_length(header, limits)  # validated before anything is allocated
        buf = bytearray(header)
        try:
            buf += await reader.readexactly(n - HEADER_BYTES)
        except asyncio.IncompleteReadError as exc:
            raise WireError(
                f"frame: stream ended after {HEADER_BYTES + len(exc.partial)} of {n} bytes"
            ) from None
    return decode(buf, limits)


async def write_frame(
    writer: asyncio.StreamWriter, frame: Frame, limits: WireLimits = DEFAULT_LIMITS
) -> None:
    """Write a frame (its tensors' memory, part by part) and wait until at most ``_quic.DRAIN_BOUND_BYTES``
    of the stream are unsent; raises ConnectionError if the connection closes meanwhile."""
    _write_parts(writer, encode(frame, limits))
    await _quic.drain(writer)


def write_frame_nowait(
    writer: asyncio.StreamWriter, frame: Frame, limits: WireLimits = DEFAULT_LIMITS
) -> bool:
    """Write a frame at once if the stream has room (``_quic.has_room``) and transmit it in this call
    (``_quic.flush``); False: nothing written, use :func:`write_frame`. Raises ConnectionError if the
    connection is closed."""
    if not _quic.has_room(writer):
        return False
    _write_parts(writer, encode(frame, limits))
    _quic.flush(writer)
    return True


def _write_parts(writer: asyncio.StreamWriter, parts: list[bytes | memoryview]) -> None:
    """Write ``parts``; a closed connection is a ConnectionError (qh3 raises its own error type)."""
    try:
        for part in parts:
            writer.write(part)
    except QuicConnectionError as exc:
        raise ConnectionError(f"the connection is closed: {exc}") from None


def _raise_if_error(frame: Frame) -> Frame:
    if frame.type == MessageType.ERROR:
        raise PeerErrorReply(str(frame.meta.get("code", "error")), str(frame.meta.get("message", "")))
    return frame


class RefusalLog:
    """Warnings of refused peers and frames, rate-limited: one per key every ``interval_s`` (a
    misconfigured or hostile peer retries every gossip round, or every frame), the rest at debug
    level. Keys are small tuples such as (host, reason) or (sender node id, frame type)."""

    def __init__(self, logger: logging.Logger, interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.count = 0
        self._last: dict[Hashable, float] = {}

    def warn(self, key: Hashable, msg: str, *args: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.interval_s:
            self.logger.debug(msg, *args)
            return
        if len(self._last) > 1024:
            self._last.clear()
        self._last[key] = now
        self.logger.warning(msg, *args)


# ------------------------------------------------------------------------------------- server
Handler = Callable[[Frame, "PeerContext"], Awaitable[Frame | None]]
# Called during a handshake with the client's node id and certificate fingerprint once both proofs
# and the signature verified; raises AuthError to refuse that identity.
Identify = Callable[[str, bytes], Awaitable[None]]


@dataclass
class PeerContext:
    """What a handler knows about the connection a frame came from: the peer's node id, bound by
    the handshake to the certificate whose fingerprint is ``peer_fp``."""

    peer_node_id: str
    address: tuple[str, int] | None
    peer_fp: bytes = b""
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Conn:
    authenticated: asyncio.Event = field(default_factory=asyncio.Event)  # also set when refused
    ctx: PeerContext | None = None
    handshake_started: bool = False
    refused: bool = False


#: What a ``fast_handler`` returns for a frame it leaves to the (async) ``handler``.
HANDLE_ASYNC: Any = object()


class PeerServer:
    """Accepts QUIC connections, authenticates them and answers frames with ``handler``.

    The handler is called once per received frame (after the handshake); what it returns is written
    back on the same stream. A malformed frame is answered with ``ERROR`` (code ``bad_frame``) and the
    stream is closed; the server keeps serving every other stream and connection.

    With a ``fast_handler`` (synchronous, same contract, or :data:`HANDLE_ASYNC` to pass a frame on
    to ``handler``), an authenticated stream's frames are parsed as its data arrives, in the QUIC
    receive callback (:class:`_FrameSink`), and handed to it there: no task wakes up per frame. A
    frame left to ``handler`` holds the stream's later frames until it is done, so a stream's frames
    are always handled in order.

    ``on_connection`` is told of every authenticated connection (as an :class:`InboundConnection`,
    on which this side may open streams too); :meth:`serve_stream` serves the streams a peer opens
    on a connection this node opened, with the same handlers.
    """

    def __init__(
        self,
        node_id: str,
        handler: Handler,
        *,
        key: bytes | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        idle_timeout_s: float = 300.0,
        identify: Identify | None = None,
        fast_handler: Callable[[Frame, PeerContext], Frame | None] | None = None,
        on_connection: Callable[[InboundConnection], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.on_connection = on_connection
        self.handler = handler
        self.fast_handler = fast_handler
        self.key = key
        self.limits = limits
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.identify = identify
        self.cert = make_certificate(node_id)
        self._server: Any = None
        # Keyed by the connection's protocol object itself (weakly): an id() can be reused by a later
        # connection once the first is gone, which would skip that one's handshake.
        self._conns: weakref.WeakKeyDictionary[Any, _Conn] = weakref.WeakKeyDictionary()
        self._tasks: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None
        self.refused = 0  # connections dropped for failing authentication
        self._refusals = RefusalLog(log)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        cfg = quic_configuration(is_client=False, cert=self.cert)
        cfg.idle_timeout = self.idle_timeout_s
        self._server = await _quic.serve(host, port, configuration=cfg, stream_handler=self._on_stream)
        sock = self._server._transport.get_extra_info("socket")
        self.address = sock.getsockname()[:2]
        if self.key is None:
            log.warning(
                "node %s: open network (no key_file): any peer that can reach %s may join",
                self.node_id,
                self.address,
            )
        return self.address

    async def close(self) -> None:
        """Stop listening, close every connection and finish every stream task."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve_stream(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_error)

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = writer.transport.protocol  # type: ignore[attr-defined]
        conn = self._conns.setdefault(protocol, _Conn())
        try:
            if not conn.authenticated.is_set():
                if conn.handshake_started:  # a second stream while the first authenticates
                    await asyncio.wait_for(conn.authenticated.wait(), HANDSHAKE_TIMEOUT_S)
                else:
                    conn.handshake_started = True
                    handshake = self._handshake(reader, writer, protocol, conn)
                    await asyncio.wait_for(handshake, HANDSHAKE_TIMEOUT_S)
            if conn.refused:  # a stream of a connection being closed: nothing of it is read
                return
            assert conn.ctx is not None
            await self._serve_authenticated(reader, writer, conn.ctx)
        except (AuthError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = AuthError(f"no handshake within {HANDSHAKE_TIMEOUT_S:g} s")
            self.refused += 1
            self._log_refusal(protocol, exc)
            # Every other stream of the connection is dropped unread, now and until it is closed.
            conn.refused = True
            conn.authenticated.set()
            with contextlib.suppress(Exception):
                await write_frame(writer, error_frame("unauthenticated", str(exc)), self.limits)
            # Close once the ERROR frame had a moment to leave; nothing else is read meanwhile.
            asyncio.get_running_loop().call_later(0.5, protocol.close)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: PeerContext
    ) -> None:
        """Serve a stream that the peer ``ctx`` opened on a connection this node opened (and whose
        handshake authenticated that peer), as if it had arrived here."""
        task = asyncio.ensure_future(self._serve_peer_stream(reader, writer, ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_error)

    async def _serve_peer_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: PeerContext
    ) -> None:
        try:
            await self._serve_authenticated(reader, writer, ctx)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    async def _serve_authenticated(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: PeerContext
    ) -> None:
        """Answer the frames of an authenticated stream until it ends."""
        if self.fast_handler is not None and isinstance(reader, _quic.DivertingReader):
            await self._serve_diverted(reader, writer, ctx)
            return
        while True:
            try:
                # An authenticated stream may idle between frames for as long as its connection
                # lives (QUIC's idle timeout and gossip bound that); a frame once begun must
                # arrive within idle_timeout_s.
                frame = await read_frame(reader, self.limits, timeout=self.idle_timeout_s, wait=None)
            except WireError as exc:
                log.info("bad frame from %s: %s", ctx.peer_node_id, exc)
                await write_frame(writer, error_frame("bad_frame", str(exc)), self.limits)
                break
            except TimeoutError:
                log.info(
                    "a frame from %s stalled for %g s mid-way; closing the stream",
                    ctx.peer_node_id,
                    self.idle_timeout_s,
                )
                break
            if frame is None:
                break
            try:
                reply = await self.handler(frame, ctx)
            except Exception as exc:  # noqa: BLE001 - the peer gets an answer, the server stays up
                reply = _error_reply(frame, exc)
            if reply is not None:
                await write_frame(writer, reply, self.limits)

    async def _serve_diverted(
        self, reader: _quic.DivertingReader, writer: asyncio.StreamWriter, ctx: PeerContext
    ) -> None:
        """Serve an authenticated stream through a :class:`_FrameSink` until it ends (or a begun
        frame stalls for ``idle_timeout_s``)."""
        sink = _FrameSink(self, ctx, writer)
        reader.divert(sink)
        try:
            while not sink.done.done():
                await asyncio.wait({sink.done}, timeout=self.idle_timeout_s)
                if sink.stalled(self.idle_timeout_s):
                    log.info(
                        "a frame from %s stalled for %g s mid-way; closing the stream",
                        ctx.peer_node_id,
                        self.idle_timeout_s,
                    )
                    break
        finally:
            sink.close()

    def _log_refusal(self, protocol: Any, exc: AuthError) -> None:
        """A warning per (peer host, reason) every ``REFUSAL_LOG_INTERVAL_S``; the rest at debug level."""
        addr = _quic.peer_address(protocol)
        host = addr[0] if addr else "?"
        self._refusals.warn(
            (host, exc.reason), "refusing a peer at %s: %s (%d refused so far)", host, exc, self.refused
        )

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: Any, conn: _Conn
    ) -> None:
        """The server's side of the handshake (``lpipes.net.auth``); raises :class:`AuthError`."""
        try:
            hello = await read_frame(reader, self.limits, timeout=None)
        except WireError as exc:
            raise AuthError(f"handshake: {exc}") from None
        if hello is None or hello.type != MessageType.HELLO:
            raise AuthError("handshake: the first frame must be HELLO")
        peer_id = check_node_id(hello.meta.get("node_id"))
        nonce_c = check_nonce(hello.meta.get("nonce"))
        nonce_s = new_nonce()
        t = transcript(nonce_c, nonce_s, peer_id, self.node_id, self.cert.fingerprint)
        mine = proof(self.key, "server", t)
        welcome = Frame(MessageType.WELCOME, {"node_id": self.node_id, "nonce": nonce_s, "proof": mine})
        await write_frame(writer, welcome, self.limits)
        try:
            final = await read_frame(reader, self.limits, timeout=None)
        except WireError as exc:
            raise AuthError(f"handshake: {exc}") from None
        if final is None or final.type != MessageType.HELLO:
            raise AuthError("handshake: expected the client's proof")
        if final.meta.get("nonce") != nonce_c or final.meta.get("node_id") != peer_id:
            raise AuthError("handshake: the second HELLO must repeat the first one's node_id and nonce")
        # The proof first (cheap, and it refuses outsiders), then the signature by the certificate.
        fp_c = cert_fingerprint(final.meta.get("cert"))
        check_proof(self.key, final.meta.get("proof"), "client", t, fp_c)
        verify_identity(final.meta.get("cert"), final.meta.get("sig"), t)
        if peer_id == self.node_id:
            raise AuthError(f"the peer claims this node's own id {peer_id!r}", "identity")
        if self.identify is not None:
            await self.identify(peer_id, fp_c)
        await write_frame(writer, Frame(MessageType.WELCOME, {"ok": True}), self.limits)
        conn.ctx = PeerContext(peer_id, _quic.peer_address(protocol), fp_c)
        conn.authenticated.set()
        if self.on_connection is not None:
            self.on_connection(InboundConnection(protocol, conn.ctx, self.limits, self.timeout_s))


def _error_reply(frame: Frame, exc: Exception) -> Frame:
    """The ``ERROR`` answer to a frame whose handler raised ``exc``."""
    if isinstance(exc, WireError):  # well-framed but invalid for its type
        return error_frame("bad_frame", str(exc), **_echo(frame))
    if isinstance(exc, LpipesError):
        return error_frame(type(exc).__name__, str(exc), **_echo(frame))
    log.error("handler failed on a %s frame", frame.type.name, exc_info=exc)
    return error_frame("internal", f"{type(exc).__name__}: {exc}", **_echo(frame))


class _FrameSink:
    """The frames of one authenticated server stream, cut from its data as qh3 delivers it (in the
    connection's receive callback) and handed to the server's ``fast_handler`` right there. A frame
    it leaves to ``handler``, or a reply that cannot be written at once, pauses the stream until a
    task has finished with it; later data is buffered meanwhile, so frames keep their order.
    Malformed data gets an ``ERROR`` ``bad_frame`` reply and ends the stream, as on the reader path."""

    def __init__(self, server: PeerServer, ctx: PeerContext, writer: asyncio.StreamWriter) -> None:
        self.server, self.ctx, self.writer = server, ctx, writer
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.buf = bytearray()
        self.busy = False  # a task handles a frame (or writes a reply): later frames wait
        self.ended = False  # the stream's end arrived (later than its data)
        self.closed = False
        self.partial_since: float | None = None  # loop time the buffered, incomplete frame began

    # -- the reader's side (receive callback)
    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.buf:
            self.partial_since = self.loop.time()
        self.buf += data
        if not self.busy:
            self._run_guarded()

    def end(self) -> None:
        self.ended = True
        if not self.busy:
            self._run_guarded()

    def _run_guarded(self) -> None:
        # Called from qh3's event processing: nothing may escape into it.
        try:
            self._run()
        except Exception:  # noqa: BLE001 - logged; the stream ends, the connection goes on
            log.exception("frame stream from %s failed", self.ctx.peer_node_id)
            self.close()

    # -- the serving task's side
    def stalled(self, after_s: float) -> bool:
        return self.partial_since is not None and self.loop.time() - self.partial_since >= after_s

    def close(self) -> None:
        self.closed = True
        self.buf = bytearray()
        if not self.done.done():
            self.done.set_result(None)

    # -- frames
    def _run(self) -> None:
        limits = self.server.limits
        while not self.busy and not self.closed:
            buf = self.buf
            if len(buf) < HEADER_BYTES:
                break
            try:
                n = frame_length(bytes(buf[:HEADER_BYTES]), limits)
            except WireError as exc:
                self._bad(exc)
                return
            if len(buf) < n:
                break
            if len(buf) == n:  # the usual case: the buffer becomes the frame's own memory
                raw, self.buf = buf, bytearray()
            else:
                raw = buf[:n]
                del buf[:n]
            self.partial_since = self.loop.time() if self.buf else None
            try:
                frame = decode(raw, limits)
            except WireError as exc:
                self._bad(exc)
                return
            self._dispatch(frame)
        if self.ended and not self.busy and not self.closed:
            if self.buf:  # the stream ended inside a frame
                n = len(self.buf)
                if n < HEADER_BYTES:
                    self._bad(WireError(f"frame: stream ended inside a header ({n} bytes)"))
                else:
                    want = frame_length(bytes(self.buf[:HEADER_BYTES]), limits)
                    self._bad(WireError(f"frame: stream ended after {n} of {want} bytes"))
                return
            self.close()

    def _dispatch(self, frame: Frame) -> None:
        fast = self.server.fast_handler
        assert fast is not None
        try:
            reply = fast(frame, self.ctx)
        except Exception as exc:  # noqa: BLE001 - the peer gets an answer, the server stays up
            reply = _error_reply(frame, exc)
        if reply is HANDLE_ASYNC:
            self._later(self._slow(frame))
        elif reply is not None:
            self._reply(reply)

    def _reply(self, reply: Frame) -> None:
        try:
            if write_frame_nowait(self.writer, reply, self.server.limits):
                return
        except ConnectionError:
            self.close()
            return
        self._later(write_frame(self.writer, reply, self.server.limits))

    def _bad(self, exc: WireError) -> None:
        """Answer ``bad_frame`` and end the stream, both in one transmit: the sender sees the end
        right behind the refusal (and drops the stream) before it can send more into it."""
        log.info("bad frame from %s: %s", self.ctx.peer_node_id, exc)
        with contextlib.suppress(ConnectionError, WireError):
            _write_parts(self.writer, encode(error_frame("bad_frame", str(exc)), self.server.limits))
            self.writer.write_eof()
        self.close()  # nothing more of this stream is read

    def _later(self, work: Awaitable[Any]) -> None:
        self.busy = True
        task = asyncio.ensure_future(self._resume_after(work))
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)
        task.add_done_callback(_log_task_error)

    async def _resume_after(self, work: Awaitable[Any]) -> None:
        try:
            await work
        except (ConnectionError, TimeoutError):
            self.close()
        finally:
            self.busy = False
        if self.closed:
            self.close()
        else:
            self._run()

    async def _slow(self, frame: Frame) -> None:
        try:
            reply = await self.server.handler(frame, self.ctx)
        except Exception as exc:  # noqa: BLE001 - the peer gets an answer, the server stays up
            reply = _error_reply(frame, exc)
        if reply is not None:
            await write_frame(self.writer, reply, self.server.limits)


def _echo(frame: Frame) -> dict[str, Any]:
    return {k: frame.meta[k] for k in ("session", "step") if k in frame.meta}


def _log_task_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("stream task failed", exc_info=task.exception())


# ------------------------------------------------------------------------------------- client
class FrameStream:
    """One bidirectional stream of a connection: send frames, read replies in order."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: WireLimits, timeout_s: float
    ):
        self.reader, self.writer, self.limits, self.timeout_s = reader, writer, limits, timeout_s
        self._lock = asyncio.Lock()

    async def send(self, frame: Frame) -> None:
        await write_frame(self.writer, frame, self.limits)

    def send_nowait(self, frame: Frame) -> bool:
        """Write ``frame`` now if the stream has room; False: nothing written (``await send``)."""
        return write_frame_nowait(self.writer, frame, self.limits)

    async def receive(self, timeout: float | None = None) -> Frame:
        try:
            frame = await read_frame(self.reader, self.limits, timeout=timeout or self.timeout_s)
        except TimeoutError:
            raise TransportError(f"no reply within {timeout or self.timeout_s:.0f} s") from None
        if frame is None:
            raise TransportError("the peer closed the stream")
        return frame

    async def request(self, frame: Frame, timeout: float | None = None) -> Frame:
        """Send a frame and return the reply (an ERROR reply raises :class:`PeerErrorReply`)."""
        async with self._lock:
            await self.send(frame)
            return _raise_if_error(await self.receive(timeout))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write_eof()


class _StreamsMixin:
    """Streams this side opens on an authenticated connection."""

    protocol: Any
    limits: WireLimits
    timeout_s: float

    async def open_stream(self) -> FrameStream:
        reader, writer = await self.protocol.create_stream()
        return FrameStream(reader, writer, self.limits, self.timeout_s)

    async def request(self, frame: Frame, timeout: float | None = None) -> Frame:
        """One frame out, one reply back, on a fresh stream."""
        stream = await self.open_stream()
        try:
            return await stream.request(frame, timeout)
        finally:
            stream.close()

    @property
    def closed(self) -> bool:
        return self.protocol is None or _quic.is_closed(self.protocol)


class InboundConnection(_StreamsMixin):
    """A connection a peer opened to this node's :class:`PeerServer`, as seen once the handshake
    authenticated it: this node may open streams on it too (server-initiated), to send to that peer
    without a second connection. ``close()`` closes the connection (for both ends)."""

    def __init__(self, protocol: Any, ctx: PeerContext, limits: WireLimits, timeout_s: float) -> None:
        self.protocol = protocol
        self.peer_node_id = ctx.peer_node_id
        self.peer_fp = ctx.peer_fp
        self.limits, self.timeout_s = limits, timeout_s

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.protocol.close()


class PeerConnection(_StreamsMixin):
    """An authenticated QUIC connection to one peer (opened by this node)."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.protocol: Any = None
        self.peer_node_id = ""
        self.peer_fp = b""  # the server's certificate fingerprint, covered by its proof
        self.limits = DEFAULT_LIMITS
        self.timeout_s = DEFAULT_TIMEOUT_S
        self._authenticated = asyncio.Event()
        self._waiting: set[asyncio.Task] = set()  # server-opened streams waiting for the handshake
        self._serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter, PeerContext], None] | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        node_id: str,
        key: bytes | None = None,
        cert: NodeCertificate | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter, PeerContext], None] | None = None,
        identify: Identify | None = None,
    ) -> PeerConnection:
        """Connect and run the handshake; raises :class:`TransportError` or :class:`AuthError`.

        ``cert`` is this node's certificate (its listener's), whose key signs the handshake: the
        peer binds ``node_id`` to it. A client without a listener (``lpipes status``) leaves it out
        and gets a fresh one. ``serve`` (a node's :meth:`PeerServer.serve_stream`) serves the
        streams the peer opens on this connection once the handshake authenticated it; without it
        they are left unread. ``identify`` checks the server's node id and certificate as a
        :class:`PeerServer` checks its clients' (the server's frames then come with that id); it
        raises :class:`AuthError` to refuse them.
        """
        self = cls()
        self.limits, self.timeout_s = limits, timeout_s
        self._serve = serve
        cert = cert or make_certificate(node_id)
        try:
            await asyncio.wait_for(
                self._connect(host, port, node_id, key, cert, identify), handshake_timeout_s
            )
        except TimeoutError:
            await self.close()
            raise TransportError(
                f"cannot reach a peer at {host}:{port} (no handshake within {handshake_timeout_s:g} s)"
            ) from None
        except PeerErrorReply as exc:
            await self.close()
            raise AuthError(f"{host}:{port} refused this node: {exc}") from None
        except TransportError as exc:
            await self.close()
            raise AuthError(
                f"{host}:{port} ended the handshake ({exc}); does this node use the network's key?"
            ) from None
        except AuthError:
            await self.close()
            raise
        except OSError as exc:
            await self.close()
            raise TransportError(f"cannot connect to {host}:{port}: {exc}") from None
        return self

    async def _connect(
        self,
        host: str,
        port: int,
        node_id: str,
        key: bytes | None,
        cert: NodeCertificate,
        identify: Identify | None = None,
    ) -> None:
        """The client's side of the handshake (``lpipes.net.auth``): the server's proof is checked
        before anything of this node's proof or identity leaves."""
        self.protocol = await self._stack.enter_async_context(
            _quic.connect(
                host,
                port,
                configuration=quic_configuration(is_client=True),
                wait_connected=True,
                stream_handler=self._on_stream if self._serve is not None else None,
            )
        )
        stream = await self.open_stream()
        try:
            nonce_c = new_nonce()
            welcome = await stream.request(Frame(MessageType.HELLO, {"node_id": node_id, "nonce": nonce_c}))
            if welcome.type != MessageType.WELCOME:
                raise AuthError("handshake: expected WELCOME")
            peer_id = check_node_id(welcome.meta.get("node_id"))
            nonce_s = check_nonce(welcome.meta.get("nonce"))
            fp_s = _quic.peer_fingerprint(self.protocol)
            t = transcript(nonce_c, nonce_s, node_id, peer_id, fp_s)
            check_proof(key, welcome.meta.get("proof"), "server", t)
            if identify is not None:
                if peer_id == node_id:
                    raise AuthError(f"the peer claims this node's own id {peer_id!r}", "identity")
                await identify(peer_id, fp_s)
            cert_hex, sig = sign_identity(cert, t)
            final = Frame(
                MessageType.HELLO,
                {
                    "node_id": node_id,
                    "nonce": nonce_c,
                    "cert": cert_hex,
                    "sig": sig,
                    "proof": proof(key, "client", t, cert.fingerprint),
                },
            )
            ok = await stream.request(final)
            if ok.meta.get("ok") is not True:
                raise AuthError("handshake: the peer did not accept the proof")
            self.peer_node_id, self.peer_fp = peer_id, fp_s
            self._authenticated.set()
        finally:
            stream.close()

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A stream the server opened: served once this side's handshake has verified the server
        (the server may open one as soon as it verified this side, a moment earlier)."""
        task = asyncio.ensure_future(self._serve_when_authenticated(reader, writer))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def _serve_when_authenticated(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await asyncio.wait_for(self._authenticated.wait(), HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            writer.write_eof()
            return
        assert self._serve is not None
        self._serve(
            reader, writer, PeerContext(self.peer_node_id, _quic.peer_address(self.protocol), self.peer_fp)
        )

    async def close(self) -> None:
        for task in list(self._waiting):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._stack.aclose()

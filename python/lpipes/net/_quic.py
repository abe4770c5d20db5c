"""The QUIC library (qh3), imported in one place, with the tuning and the pieces its public API lacks.

Why qh3, a Rust-cored fork of aioquic with the same API: in ``bench/transport.py`` (2-vCPU VM, loopback,
server and client in separate processes, uvloop) aioquic gave an ~820 µs decode-step round trip, 5-15 MiB/s
on 4 MiB frames and ~120 CPU s/GiB; qh3 with this module's settings (configuration ``lpipes``) gives
230-280 µs, 230-265 MiB/s upload and download at ~7 CPU s/GiB (TCP on the same machine: ~110 µs,
1-2 GiB/s). What this module adds to qh3's public API:

* :func:`serve` runs the server on qh3's batched UDP transport (recvmmsg/GRO receive handed to the
  connection a burst at a time, GSO send). qh3's own ``serve`` reads one datagram at a time: 3-4x less
  upload throughput and 4x the CPU per byte in the benchmark. That transport is private qh3 API: qh3
  is pinned to 2.x, and :func:`serve` falls back to the public ``serve`` when the module is missing.
* :func:`connect` also enlarges the UDP socket buffers (``SOCKET_BUFFER_BYTES``), which no
  ``QuicConfiguration`` field covers.
* :meth:`QuicProtocol.transmit` sends straight from the connection's native core, without the per-packet
  logging work qh3 does even with no logger (~22 % less CPU per byte sent).
* :func:`drain` is the back-pressure that qh3's ``StreamWriter.drain()`` cannot give (it raises
  AttributeError: the stream adapter lacks asyncio's flow-control hooks): it waits while the stream's
  unsent bytes exceed ``DRAIN_BOUND_BYTES``, woken by the connection's transmits (ACKs, credit, pacing).
* :class:`DivertingReader`: a stream's data can go straight to a callback in the receive path
  (``divert``) instead of through the StreamReader and a task's wake-up.
* :func:`peer_fingerprint` and :func:`peer_address` read what qh3 keeps in private state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from qh3.asyncio import QuicConnectionProtocol
from qh3.asyncio import connect as _qh3_connect
from qh3.asyncio import serve as _qh3_serve
from qh3.asyncio.protocol import QuicStreamAdapter
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnectionError, QuicErrorCode

try:  # private qh3 API (2.1): the recvmmsg/GRO + GSO transport that only qh3's connect() uses
    from qh3.asyncio._transport import create_optimized_datagram_transport as _optimized_transport
    from qh3.asyncio.server import QuicServer as _QuicServer
except ImportError:  # pragma: no cover - another qh3 layout: the public, one-datagram-at-a-time serve
    _optimized_transport = None
    _QuicServer = None

MiB = 1 << 20

# max_datagram_size (UDP payload) 1452 = 1500-byte Ethernet MTU - 40 (IPv6) - 8 (UDP): the largest that
# fits an Ethernet path for both IP versions. Measured alternatives, all with the settings below:
# * 16384 / 65527 ("jumbo") gives 1.5-4x the upload on loopback (65527: 330-820 vs 130-270 MiB/s) but
#   only there: on a 1500-MTU link qh3's path-MTU probing never climbs back from such a ceiling; it fell
#   to 1200-byte packets for the whole connection (128 MiB over a veth pair), slower than 1452. Downloads
#   gain nothing anyway: qh3 clients advertise max_udp_payload_size 1472, so servers never send more.
# * 1472 (IPv4 Ethernet) is too big for IPv6 on Ethernet.
# Smaller paths (WireGuard 1420, Tailscale 1280) still work: the client probes (probe_datagram_size) and
# falls back to 1200 when 1452 is lost; the server does not probe, so its socket lets the kernel fragment
# instead (see _let_kernel_fragment). The windows are sized for prefill frames of tens of MiB; on
# loopback they made no difference (QUIC is bound by CPU per packet), on a LAN they bound the bytes in
# flight per RTT.
TUNING: dict[str, Any] = {"max_data": 64 * MiB, "max_stream_data": 32 * MiB, "max_datagram_size": 1452}

# SO_RCVBUF/SO_SNDBUF of every QUIC UDP socket (Linux doubles it, capped by net.core.[rw]mem_max): a
# 4 MiB frame arrives as ~3000 datagrams in a burst; the default ~208 KiB dropped some in the benchmark.
SOCKET_BUFFER_BYTES = 4 * MiB

# drain() returns once at most this many bytes of a stream wait for their first transmission: enough
# to keep the connection busy for tens of ms at the measured rates, a bound on what a writer queues.
DRAIN_BOUND_BYTES = 4 * MiB
_DRAIN_RECHECK_S = 0.1  # safety net for a missed wake-up; normally a transmit wakes the writer
# After a burst of at most ACK_DEFER_MAX_BURST datagrams (a decode step's frame is 2), the connection's
# transmit (its ACK) waits for the next write on that connection or ACK_DEFER_S (1-2 ms with uvloop's
# millisecond timers; well within QUIC's default max_ack_delay of 25 ms) instead of going out before the
# frame is even handled: in bench/pipeline.py (3 processes on 2 cores) that lone ACK sat on every hop's
# critical path for 70-140 µs. A timer of 1 ms fired at once half the time (uvloop rounds to its ms clock).
ACK_DEFER_MAX_BURST = 4
ACK_DEFER_S = 0.002


class DivertingReader(asyncio.StreamReader):
    """The StreamReader of every stream of a :class:`QuicProtocol`. After :meth:`divert`, the
    stream's data goes to the sink as qh3 receives it (in the protocol's receive callback), not to
    the reader's buffer: a frame can be handled without waking a task and reading it back."""

    _sink: Any = None

    def divert(self, sink: Any) -> None:
        """From now on, ``sink.feed(data)`` for each piece of the stream's data and ``sink.end()`` once
        at its end (a FIN, a reset, a closed connection); what is already buffered is fed first."""
        self._sink = sink
        if self._buffer:  # asyncio's own buffer (a subclass may read it)
            data = bytes(self._buffer)
            self._buffer.clear()
            sink.feed(data)
        if self._eof or self._exception is not None:
            sink.end()

    def feed_data(self, data: bytes) -> None:
        if self._sink is not None:
            if data:
                self._sink.feed(data)
            return
        super().feed_data(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        if self._sink is not None:
            self._sink.end()

    def set_exception(self, exc: BaseException) -> None:
        super().set_exception(exc)
        if self._sink is not None:
            self._sink.end()


class QuicProtocol(QuicConnectionProtocol):
    """qh3's connection protocol, plus wake-ups for :func:`drain` after every transmit and a
    :class:`DivertingReader` for every stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drain_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._deferred_transmit: asyncio.TimerHandle | None = None

    def _create_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # qh3's own, with a DivertingReader
        adapter = QuicStreamAdapter(self, stream_id)
        reader = DivertingReader()
        writer = asyncio.StreamWriter(adapter, None, reader, self._loop)
        self._stream_readers[stream_id] = reader
        return reader, writer

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        # A client connection's burst (a server's bursts come through _BatchingQuicServer, which
        # already runs the call_after_burst callbacks once for all its connections).
        _in_burst(self._receive_many, data, addr)

    def _receive_many(self, data: list[bytes], addr: Any) -> None:
        self._quic.receive_many_datagrams(data, addr, now=self._loop_time())
        self._process_events()
        self._transmit_after_receive(len(data))

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._quic.receive_datagram(data, addr, now=self._loop_time())  # type: ignore[arg-type]
        self._process_events()
        self._transmit_after_receive(1)

    def _transmit_after_receive(self, datagrams: int) -> None:
        """qh3 transmits after every receive: for a small burst that is a lone ACK, sent before the
        received frame is even handled. Here a small burst's transmit waits for the handler's own
        writes (which carry the ACK if on the same connection) or ``ACK_DEFER_S``; handshakes and bulk
        transfers (the sender's congestion window grows with ACKs) transmit at once as before."""
        if datagrams > ACK_DEFER_MAX_BURST or not self._connected:
            self.transmit()
        elif self._transmit_task is None and self._deferred_transmit is None:
            self._deferred_transmit = self._loop.call_later(ACK_DEFER_S, self._transmit_deferred)

    def _transmit_deferred(self) -> None:
        self._deferred_transmit = None
        self.transmit()

    def transmit(self) -> None:
        if self._deferred_transmit is not None:
            self._deferred_transmit.cancel()
            self._deferred_transmit = None
        quic = self._quic
        core = getattr(quic, "_core", None)
        if core is None or self._sendto_many is None or getattr(quic, "_quic_logger", True) is not None:
            super().transmit()
        else:
            self._transmit_lean(core)
        if self._drain_waiters:
            self._wake_drainers()

    def _transmit_lean(self, core: Any) -> None:
        """qh3's ``transmit`` for the common case (the connection's native core, a transport with
        ``sendto_many``, no QUIC logger): the packets straight from the core's ``poll_transmit`` to
        the socket. qh3's ``datagrams_to_send`` wraps every packet in calls that matter only with a
        logger (parsing each packet's headers, slicing them out) and in a list of tuples; this loop
        spends ~22 % less CPU per byte sent (``bench/transport.py`` bulk: 190-200 -> 240-265 MiB/s,
        one sending core saturated). The timer is re-armed as qh3 does."""
        self._transmit_task = None
        now = self._loop_time()
        poll, sendto_many = core.poll_transmit, self._sendto_many
        datagrams: list[bytes] = []
        send_addr = None
        while True:
            try:
                packet = poll(now)
            except RuntimeError as exc:  # as qh3's _call_core reports a core failure
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
            if packet is None:
                break
            data, addr = packet[0], packet[1]
            if datagrams and addr != send_addr:
                sendto_many(datagrams, send_addr)
                datagrams = []
            datagrams.append(data)
            send_addr = addr
        if datagrams:
            sendto_many(datagrams, send_addr)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def _wake_drainers(self) -> None:
        closed = _is_closed(self)
        quic = self._quic
        waiting = []
        for stream_id, bound, fut in self._drain_waiters:
            if fut.done():
                continue
            if closed or quic.get_send_buffer_size(stream_id) <= bound:
                fut.set_result(None)
            else:
                waiting.append((stream_id, bound, fut))
        self._drain_waiters = waiting


def _is_closed(protocol: Any) -> bool:
    # qh3 sets _close_event as soon as either end closes (get_send_buffer_size then reads 0), and
    # protocol._closed once the connection has terminated.
    return getattr(protocol._quic, "_close_event", None) is not None or protocol._closed.is_set()


def is_closed(protocol: Any) -> bool:
    """True once either end closed the connection (or it terminated)."""
    return _is_closed(protocol)


def has_room(writer: asyncio.StreamWriter, bound: int = DRAIN_BOUND_BYTES) -> bool:
    """True if at most ``bound`` bytes of this QUIC stream are unsent (the state :func:`drain` waits
    for): a write now needs no wait. False for a full stream, or a stream that is not QUIC.

    The one-way frames of a decode step take this path: no task, no timer, no await (qh3 sends them
    at the connection's next transmit, which the write schedules).

    Raises:
        ConnectionError: the connection is closed.
    """
    adapter = writer.transport
    stream_id = adapter.get_extra_info("stream_id")
    protocol = getattr(adapter, "protocol", None)
    if stream_id is None or protocol is None:
        return False
    if _is_closed(protocol):
        raise ConnectionError("the QUIC connection is closed")
    return protocol._quic.get_send_buffer_size(stream_id) <= bound


def flush(writer: asyncio.StreamWriter) -> None:
    """Transmit what was just written to this QUIC stream now, in the caller's callback, instead of
    at qh3's transmit scheduled for the loop's next iteration (``call_soon``): a decode step's frame
    leaves one loop iteration (tens of µs on a busy loop) earlier. No-op for other streams."""
    protocol = getattr(writer.transport, "protocol", None)
    if not isinstance(protocol, QuicProtocol):
        return
    handle = protocol._transmit_task
    if handle is not None:
        handle.cancel()
    protocol.transmit()


async def drain(writer: asyncio.StreamWriter, bound: int = DRAIN_BOUND_BYTES) -> None:
    """Wait until at most ``bound`` bytes of this QUIC stream are still unsent.

    Raises:
        ConnectionError: the connection is closed (or closes while waiting).
    """
    adapter = writer.transport
    stream_id = adapter.get_extra_info("stream_id")
    protocol = getattr(adapter, "protocol", None)
    if stream_id is None or protocol is None:  # not a QUIC stream
        await writer.drain()
        return
    quic = protocol._quic
    waiters = getattr(protocol, "_drain_waiters", None)  # None: a protocol without the transmit hook
    loop = asyncio.get_running_loop()
    while True:
        if _is_closed(protocol):
            raise ConnectionError("the QUIC connection is closed")
        if quic.get_send_buffer_size(stream_id) <= bound:
            return
        if waiters is None:
            await asyncio.sleep(0.002)
            continue
        fut: asyncio.Future[None] = loop.create_future()
        waiters.append((stream_id, bound, fut))
        try:
            await asyncio.wait({fut}, timeout=_DRAIN_RECHECK_S)
        finally:
            if not fut.done():
                fut.cancel()  # the transmit hook drops it


def set_socket_buffers(sock: socket.socket, size: int = SOCKET_BUFFER_BYTES) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _let_kernel_fragment(sock: socket.socket) -> None:
    """Undo the don't-fragment mode (IP_PMTUDISC_PROBE) that qh3's UDP transport sets.

    A qh3 server does not probe the path MTU, so with DF always set its 1452-byte packets to a peer
    behind a smaller link (a VPN, Tailscale's 1280) are dropped and the handshake fails; measured on a
    veth pair. IP_PMTUDISC_WANT, the default of a plain socket (qh3's public serve), sets DF only while a
    packet fits the known path MTU and fragments otherwise, and learns the path MTU from ICMP.
    """
    if not sys.platform.startswith("linux"):
        return
    ip_mtu_discover, ipv6_mtu_discover, pmtudisc_want = 10, 23, 1  # <linux/in.h>, <linux/in6.h>
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, ip_mtu_discover, pmtudisc_want)
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, ipv6_mtu_discover, pmtudisc_want)


_after_burst: list[Any] | None = None  # callbacks to run once the received burst is handled


def call_after_burst(fn: Any) -> bool:
    """Run ``fn()`` once every datagram of the burst being received now is handled (everything one
    receive call of a server read, over all its connections, or one receive call of a client
    connection), in that same callback; False when no burst is being handled (use
    ``loop.call_soon``). A layer peer batches every step frame of the burst this way, without
    waiting for the loop's next iteration."""
    if _after_burst is None:
        return False
    _after_burst.append(fn)
    return True


def _in_burst(receive: Any, *args: Any) -> None:
    """``receive(*args)``, then the :func:`call_after_burst` callbacks it queued (inside an outer
    burst: left to that one)."""
    global _after_burst
    if _after_burst is not None:
        receive(*args)
        return
    _after_burst = []
    try:
        receive(*args)
    finally:
        callbacks, _after_burst = _after_burst, None
    for fn in callbacks:
        try:
            fn()
        except Exception:  # noqa: BLE001 - one callback's failure must not skip the others
            logging.getLogger(__name__).exception("after-burst callback failed")


if _QuicServer is not None:

    class _BatchingQuicServer(_QuicServer):
        """Hands each burst of a connection's 1-RTT packets to it in one call (one transmit per burst);
        qh3's QuicServer only has the one-datagram ``datagram_received``. Runs the
        :func:`call_after_burst` callbacks once the whole burst is handled."""

        def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
            _in_burst(self._receive_burst, datagrams, addr)

        def _receive_burst(self, datagrams: list[bytes], addr: Any) -> None:
            cid_len = self._configuration.connection_id_length
            batch: list[bytes] = []
            target = None
            for data in datagrams:
                # short header (1-RTT): first bit clear, then our connection ID
                proto = self._protocols.get(data[1 : 1 + cid_len]) if data and not data[0] & 0x80 else None
                if proto is not target and batch:
                    target.datagrams_received(batch, addr)
                    batch = []
                target = proto
                if proto is None:
                    self.datagram_received(data, addr)  # handshake packets, new connections
                else:
                    batch.append(data)
            if batch:
                target.datagrams_received(batch, addr)


async def serve(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    stream_handler: Any = None,
    create_protocol: Any = QuicProtocol,
) -> Any:
    """Listen on ``host:port`` (UDP); returns qh3's QuicServer (``close()``, ``_transport``)."""
    loop = asyncio.get_running_loop()
    if _optimized_transport is None:
        server = await _qh3_serve(
            host,
            port,
            configuration=configuration,
            create_protocol=create_protocol,
            stream_handler=stream_handler,
        )
        set_socket_buffers(server._transport.get_extra_info("socket"))
        return server
    family, _, _, _, addr = (
        await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    )[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(addr)
        set_socket_buffers(sock)
    except BaseException:
        sock.close()
        raise
    _, server = await _optimized_transport(
        loop,
        lambda: _BatchingQuicServer(
            configuration=configuration, create_protocol=create_protocol, stream_handler=stream_handler
        ),
        sock=sock,
    )
    _let_kernel_fragment(sock)
    return server


@contextlib.asynccontextmanager
async def connect(
    host: str, port: int, *, configuration: QuicConfiguration, wait_connected: bool = True, **kwargs: Any
) -> AsyncIterator[Any]:
    """qh3's ``connect`` with :class:`QuicProtocol` and enlarged socket buffers; closes on exit."""
    kwargs.setdefault("create_protocol", QuicProtocol)
    transport = None
    try:
        async with _qh3_connect(
            host, port, configuration=configuration, wait_connected=False, **kwargs
        ) as protocol:
            transport = protocol._transport
            set_socket_buffers(transport.get_extra_info("socket"))
            if wait_connected:
                try:
                    await protocol.wait_connected()
                except BaseException:
                    # Cancelled (a handshake timeout): qh3 later fails its connected-waiter with
                    # ConnectionError when the connection closes; retrieve it so asyncio logs no
                    # "Future exception was never retrieved".
                    waiter = protocol._connected_waiter
                    if waiter is not None:
                        waiter.add_done_callback(_retrieve)
                    raise
            yield protocol
    finally:
        # qh3 closes its socket only after the connection's close completed: an exit cancelled while
        # it waits for that (a timeout, a node shutting down) would leave the socket open.
        if transport is not None and not transport.is_closing():
            transport.close()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def peer_fingerprint(protocol: Any) -> bytes:
    """SHA-256 of the DER certificate the peer presented in the TLS handshake."""
    cert = protocol._quic.get_peercert()
    if cert is None:
        raise ConnectionError("the peer presented no certificate")
    return hashlib.sha256(cert.public_bytes()).digest()


def peer_address(protocol: Any) -> tuple[str, int] | None:
    """The peer's current (host, port), IPv4-mapped IPv6 addresses unmapped; None before any packet."""
    addr = None
    core = getattr(protocol._quic, "_core", None)
    if core is not None:
        with contextlib.suppress(Exception):
            addr = core.active_path[2]
    addr = addr or getattr(protocol._quic, "_remote_addr", None)
    if not addr:
        return None
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host, int(addr[1])


__all__ = [
    "DRAIN_BOUND_BYTES",
    "DivertingReader",
    "SOCKET_BUFFER_BYTES",
    "TUNING",
    "QuicConfiguration",
    "QuicProtocol",
    "connect",
    "call_after_burst",
    "drain",
    "flush",
    "has_room",
    "is_closed",
    "peer_address",
    "peer_fingerprint",
    "serve",
    "set_socket_buffers",
]

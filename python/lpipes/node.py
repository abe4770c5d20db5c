"""A node of the peer network: its QUIC server, membership, hosted span and — on the origin — routes.

Every ``lpipes serve`` process with a network runs one :class:`Node` on its event loop:

* a :class:`~lpipes.net.transport.PeerServer` answering frames (``PING``, ``GOSSIP``, ``FORWARD``,
  ``RESULT``, ``END_SESSION``, ``ERROR``);
* gossip: every ``gossip_interval_s`` it exchanges peer records with its bootstrap peers and up to
  three random known peers (:class:`~lpipes.swarm.Membership` drops nodes that stop refreshing);
* on a layer peer, the span executor, run on one compute thread (sessions' KV in its paged cache,
  idle sessions expire after ``session_timeout_s``);
* on the origin, :class:`RemoteStage`: the generation loop's stage for the layers other nodes run.

A step travels the route: the origin sends ``FORWARD`` to the first hop; each hop runs its span and
forwards the result to the next hop named in the route; the last hop sends ``RESULT`` to the origin
(``reply_to``). A hop that fails reports ``ERROR`` to the origin. While a step is outstanding for
longer than ``HEARTBEAT_S``, the origin pings every hop; a hop that does not answer within
``PING_TIMEOUT_S`` (or an error report, or ``step_timeout_s``) fails the step: the peer is marked,
and the engine replays the affected sessions over a new route (see :class:`RouteFailedError`).

Layer peers see hidden states, positions and opaque session ids only — never token ids, text or
logits; ``FORWARD`` metadata is validated against a closed schema.

Who may send what (``docs/threat-model.md``): the transport binds every connection's node id to a
certificate, and :meth:`Node._identify` refuses a second claimant of a live node's id. Frames about a
session are then checked against that authenticated sender: a ``FORWARD`` comes from its origin (first
hop) or from the hop before this one on its route, ``END_SESSION`` from the session's origin, and at
the origin a ``RESULT`` from the last hop of that step's route and an ``ERROR`` from one of its hops.
Anything else is answered with ``ERROR`` ``forbidden`` and logged (rate-limited).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lpipes.errors import LpipesError, NoRouteError, RouteFailedError, SessionError
from lpipes.net import _quic
from lpipes.net.auth import AuthError
from lpipes.net.poll import BusyPoll
from lpipes.net.transport import (
    HANDLE_ASYNC,
    FrameStream,
    InboundConnection,
    PeerConnection,
    PeerContext,
    PeerServer,
    RefusalLog,
    TransportError,
    read_frame,
)
from lpipes.runtime.reference import SequenceInput
from lpipes.swarm.membership import Membership
from lpipes.swarm.planning import Hop, plan_route
from lpipes.swarm.records import NODE_ID_PATTERN, PeerRecord, sign_record
from lpipes.wire import (
    DEFAULT_LIMITS,
    Frame,
    MessageType,
    WireError,
    WireLimits,
    check_tensor,
    encode_bytes,
    error_frame,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # a step outstanding this long starts liveness pings of its hops
PING_TIMEOUT_S = 1.5  # a hop that does not answer a ping within this fails the step
SWEEP_S = 5.0  # how often idle sessions are looked for
# A layer peer runs a step on its event loop thread itself (no hand-off to the compute thread and back,
# ~0.5 ms per hop) when the step is decode-sized, nothing else is computing, and the measured time of such
# a step is short enough not to hold up pings and gossip; otherwise on the compute thread.
INLINE_MAX_TOKENS = 16
INLINE_MAX_MS = 100.0
# A layer peer batches the FORWARD steps waiting for it (from every origin and step) into one executor
# call of at most this many tokens (more when one step alone is longer).
PEER_BATCH_TOKENS = 2048
HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what hidden-state tensors may be
TRACE_ENV = "LPIPES_TRACE_FRAMES"  # a file path: every received frame's summary is appended as JSON
# A frame can be lost between two live hops (a connection dropped mid-frame): each pings of an
# outstanding step asks every hop what it did with the step; a hop that passed it on this long ago (plus
# its transfer time at LOST_MIN_MBPS) while the next hop never received it fails the step at once.
LOST_GRACE_S = 2.0
LOST_MIN_MBPS = 10.0
STEP_LOG_SIZE = 4096  # steps whose progress a hop remembers
# A connection this node opened to a peer that connected to it at the same moment is closed this long
# after new frames moved to the peer's connection (what is in flight on it still arrives).
RETIRE_GRACE_S = 5.0
FAULTS_ENV = "LPIPES_FAULTS"  # test-only fault injection on a layer peer, see Faults
FORBIDDEN = "forbidden"  # the ERROR code of a frame its authenticated sender may not send
# A node id claimed with another certificate than its live record's is accepted only if the process
# at the record's address now presents that certificate (a restart there); the probe that asks gives
# up after PROBE_TIMEOUT_S, and its answer to a claim is reused for PROBE_CACHE_S (a claimant that
# repeats itself costs one probe per address then; a restarted node's new certificate is a new claim).
PROBE_TIMEOUT_S = 3.0
PROBE_CACHE_S = 5.0
DEFAULT_MAX_SESSIONS = 128


# Frame types a node handles in the QUIC receive callback (Node._handle_now); the rest in a task.
_HANDLED_NOW = frozenset({MessageType.FORWARD, MessageType.RESULT, MessageType.ERROR, MessageType.PING})

# ERROR codes of a hop that is healthy but full (its KV pool, its session limit): the step fails over
# without marking the hop as failed.
CAPACITY_ERRORS = frozenset({"KVCacheFullError", "SessionLimitError"})


class PeerStepError(LpipesError, RuntimeError):
    """This node cannot run a step it was sent (wrong span, still loading); reported to the origin."""


class SessionLimitError(PeerStepError):
    """A step would open more sessions than this node's ``max_sessions``; reported to the origin,
    which fails the step over to another route (or reports the error after its retries)."""


def model_fingerprint(config: Any) -> str:
    """A short hash of a model's text config: nodes with different models never chain."""
    d = dict(config.to_dict())
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------ frame schemas
_SessionId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
_NodeId = Annotated[str, Field(min_length=1, max_length=64, pattern=NODE_ID_PATTERN)]


class _HopModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    node_id: _NodeId
    address: Annotated[str, Field(min_length=3, max_length=262)]
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=1)]


class ForwardMeta(BaseModel):
    """The metadata of a ``FORWARD`` frame (closed: any other key is refused).

    ``route`` is the step's whole route and ``hop`` the receiver's index in it, so the receiver can
    check that the frame came from the hop before it (or, at hop 0, from the origin).
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    step: Annotated[int, Field(ge=0)]
    origin: _NodeId
    reply_to: Annotated[str, Field(min_length=3, max_length=262)]
    sessions: Annotated[list[_SessionId], Field(min_length=1, max_length=1024)]
    lens: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=1024)]
    route: Annotated[list[_HopModel], Field(min_length=1, max_length=64)]
    hop: Annotated[int, Field(ge=0, lt=64)]


class ResultMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    step: Annotated[int, Field(ge=0)]
    sessions: Annotated[list[_SessionId], Field(min_length=1, max_length=1024)]
    lens: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=1024)]


class EndMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    origin: _NodeId
    sessions: Annotated[list[_SessionId], Field(min_length=1, max_length=1024)]


def _parse(model: type[BaseModel], frame: Frame) -> Any:
    try:
        return model.model_validate(frame.meta)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise WireError(f"{frame.type.name}: {where}: {first['msg']}") from None


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# ------------------------------------------------------------------------------------ links
@dataclass
class _Link:
    conn: PeerConnection | InboundConnection  # this node's connection to the peer, or the peer's to it
    push: FrameStream  # one long-lived stream for one-way frames (FORWARD, RESULT, END_SESSION)
    reader: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class Faults:
    """Fault injection for reliability tests, read from ``LPIPES_FAULTS`` (never set in production):
    comma-separated ``delay_ms=N`` (hold every step's output N ms before passing it on: a slow peer or
    link), ``cut_after=N`` (after every N steps passed on, write half of the next step's frame, then
    drop the connection: the frame is lost mid-transfer) and ``claim_delay_ms=N`` (an ``auto`` node
    makes its chosen span known N ms late: nodes starting together choose from the same view)."""

    delay_ms: float = 0.0
    cut_after: int = 0
    claim_delay_ms: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Faults:
        values: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name not in ("delay_ms", "cut_after", "claim_delay_ms"):
                raise ValueError(
                    f"{FAULTS_ENV}: unknown fault {item!r} (delay_ms=N, cut_after=N, claim_delay_ms=N)"
                )
            values[name] = float(value)
        return cls(
            values.get("delay_ms", 0.0), int(values.get("cut_after", 0)), values.get("claim_delay_ms", 0.0)
        )


@dataclass
class _Job:
    """A received FORWARD step waiting for (or in) a batch on this peer."""

    frame: Frame
    meta: ForwardMeta
    inputs: list[SequenceInput]
    positions: torch.Tensor
    per_layer: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class _Pending:
    future: concurrent.futures.Future  # waited on by the engine thread, completed on the loop
    route: list[Hop]
    started: float  # monotonic
    timer: asyncio.TimerHandle | None = None  # the next heartbeat
    size: int = 0  # the tensor bytes of the step's frame (its transfer time counts as progress)
    sessions: list[str] = field(default_factory=list)  # what a RESULT of it must name


@dataclass
class NodeSettings:
    node_id: str
    listen: str
    bootstrap: Sequence[str] = ()
    advertise: str | None = None  # the address peers reach this node at; None: listen's host, bound port
    key: bytes | None = None
    model: str = ""
    model_hash: str = ""
    num_layers: int = 1
    hidden_size: int = 1
    dtype: str = "float16"
    end_model: bool = False
    gossip_interval_s: float = 1.0
    peer_timeout_s: float = 10.0
    session_timeout_s: float = 600.0
    step_timeout_s: float = 300.0
    max_sessions: int = DEFAULT_MAX_SESSIONS  # sessions with KV on this node at most
    limits: WireLimits = DEFAULT_LIMITS
    busy_poll_s: float = 0.0  # how long the loop polls for a step's next frame after sending one


class Node:
    """One node of the network (see the module docs). Create, then ``await start()`` on its loop."""

    def __init__(self, settings: NodeSettings) -> None:
        self.s = settings
        # A failed peer stays out of routes for a few peer timeouts (then a newer record brings it back).
        self.membership = Membership(
            settings.node_id,
            settings.key,
            peer_timeout_s=settings.peer_timeout_s,
            mark_s=3 * settings.peer_timeout_s,
        )
        self.server = PeerServer(
            settings.node_id,
            self._handle,
            key=settings.key,
            limits=settings.limits,
            identify=self._identify,
            fast_handler=self._handle_now,
            on_connection=self._on_inbound,
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.address = settings.advertise or settings.listen
        self.span: tuple[int, int] = (0, 0)
        self.ready = False
        self.executor: Any = None  # a layer peer's span executor (run on the compute thread)
        self.local_cache: Any = None  # the origin's own span's KV cache (its engine runs that span)
        self.compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lpipes-compute")
        self.ms_per_layer = 0.0
        # Versions start at the clock (ms) so a restarted node's records beat its old ones everywhere.
        self._version = itertools.count(int(time.time() * 1000))
        self._links: dict[str, _Link] = {}
        self._inbound: dict[str, InboundConnection] = {}  # node id -> the connection it opened to this node
        self._retiring: set[PeerConnection | InboundConnection] = set()  # closed RETIRE_GRACE_S after a race
        self._link_locks: dict[str, asyncio.Lock] = {}
        self._rtt_ms: dict[str, float] = {}
        self._pending: dict[int, _Pending] = {}
        self._compute_jobs = 0  # calls queued or running on the compute thread
        self._queue: collections.deque[_Job] = collections.deque()  # FORWARD steps waiting to run
        self._kick_pending = False
        self._batch_running = False
        self.batches = 0  # executor batches run (FORWARD steps batched together count once)
        self.batched_jobs = 0  # FORWARD steps run
        self._steps = itertools.count(1)
        self._sessions: dict[str, float] = {}  # "origin/session" -> last used (monotonic)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._trace = os.environ.get(TRACE_ENV)
        self._trace_lock = threading.Lock()
        self._refusals = RefusalLog(log)  # forbidden frames, failed exchanges
        # (address, claimed id, claimed certificate) -> (when probed, who answered)
        self._probes: dict[tuple[str, str, bytes], tuple[float, tuple[str, bytes] | None]] = {}
        self._probe_locks: dict[str, asyncio.Lock] = {}
        # (origin, step) -> (state, monotonic time, frame bytes): what this hop did with recent steps
        self._step_log: collections.OrderedDict[tuple[str, int], tuple[str, float, int]] = (
            collections.OrderedDict()
        )
        self.faults = Faults.parse(os.environ.get(FAULTS_ENV, ""))
        # Armed when this node sends a step's frame, stopped when one arrives (lpipes.net.poll).
        self.busy_poll = BusyPoll(settings.busy_poll_s)
        self._passed_on = 0
        if self.faults != Faults():
            log.warning("fault injection active (%s): %s", FAULTS_ENV, self.faults)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> str:
        """Listen and start gossiping; returns the address peers reach this node at (``advertise``,
        else the bound ``HOST:PORT``)."""
        self.loop = asyncio.get_running_loop()
        host, port = _address(self.s.listen)
        bound = await self.server.start(host, port)
        self.address = self.s.advertise or f"{host}:{bound[1]}"
        self._spawn(self._gossip_loop())
        self._spawn(self._sweep_loop())
        return self.address

    async def join(self, wait_s: float = 5.0) -> int:
        """Gossip with the bootstrap peers until one answered (or ``wait_s`` passed); returns how many
        peers are known then. A node without bootstrap peers starts a network and returns at once."""
        targets = [a for a in self.s.bootstrap if a != self.address]
        if not targets:
            return 0
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            results = await asyncio.gather(*(self._exchange(a) for a in targets), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.debug("bootstrap exchange failed: %r", r)
            if any(r is True for r in results):
                # A second round learns what the bootstrap peers learnt from the others meanwhile.
                await asyncio.gather(
                    *(self._exchange(r.address) for r in self.membership.peers()), return_exceptions=True
                )
                return len(self.membership.peers())
            await asyncio.sleep(0.2)
        log.warning("node %s: no bootstrap peer answered within %.0f s (%s)", self.s.node_id, wait_s, targets)
        return len(self.membership.peers())

    async def announce(self) -> None:
        """Send this node's record to every known peer and bootstrap peer now (not at the next round)."""
        targets = {a for a in self.s.bootstrap if a != self.address} | {
            r.address for r in self.membership.peers()
        }
        await asyncio.gather(*(self._exchange(a) for a in targets), return_exceptions=True)

    async def close(self) -> None:
        self._closing = True
        self.busy_poll.disarm()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for step in list(self._pending):
            self._fail(step, RouteFailedError("the node is shutting down"))
        for link in list(self._links.values()):
            await self._drop_link(link)
        for conn in list(self._retiring):
            self._retiring.discard(conn)
            await conn.close()
        await self.server.close()
        self.compute.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------- records
    def _kv_cache(self) -> Any:
        """This node's paged KV pool (a layer peer's span, or the origin's own), or None."""
        cache = getattr(self.executor, "cache", None) or self.local_cache
        return cache if hasattr(cache, "blocks_total") else None

    def kv_blocks(self) -> tuple[int, int]:
        cache = self._kv_cache()
        return (0, 0) if cache is None else (int(cache.blocks_used), int(cache.blocks_total))

    def own_record(self) -> PeerRecord:
        used, total = self.kv_blocks()
        cache = self._kv_cache()
        rec = PeerRecord(
            node_id=self.s.node_id,
            address=self.address,
            cert_fp=self.server.cert.fingerprint.hex(),
            model=self.s.model,
            model_hash=self.s.model_hash,
            num_layers=self.s.num_layers,
            start=self.span[0],
            end=self.span[1],
            dtype=self.s.dtype,
            end_model=self.s.end_model,
            ready=self.ready,
            kv_blocks_used=used,
            kv_blocks_total=total,
            kv_block_tokens=16 if cache is None else int(cache.block_size),
            ms_per_layer=round(self.ms_per_layer, 4),
            version=next(self._version),
            issued_at=time.time(),
        )
        return sign_record(rec, self.s.key)

    def records(self) -> list[dict[str, Any]]:
        """This node's fresh record and every live peer's."""
        return [self.own_record().model_dump()] + [r.model_dump() for r in self.membership.peers()]

    # --------------------------------------------------------------------- links
    async def _link(self, address: str) -> _Link:
        """The link to the node at ``address``: over the connection that node opened to this one if
        there is one (one connection per pair), else over a new connection this node opens."""
        link = self._links.get(address)
        if link is not None:
            return link
        lock = self._link_locks.setdefault(address, asyncio.Lock())
        async with lock:
            link = self._links.get(address)
            if link is not None:
                return link
            conn: PeerConnection | InboundConnection | None = self._inbound_from(address)
            if conn is None:
                opened = await self._open(
                    address, limits=self.s.limits, serve=self.server.serve_stream, identify=self._identify
                )
                # Both ends may have connected at once: the connection opened by the smaller node id
                # is the one both keep (see _on_inbound).
                theirs = self._inbound.get(opened.peer_node_id)
                if theirs is not None and not theirs.closed and opened.peer_node_id < self.s.node_id:
                    await opened.close()
                    conn = theirs
                else:
                    conn = opened
            push = await conn.open_stream()
            link = _Link(conn, push)
            link.reader = self._spawn(self._read_push_replies(address, link))
            self._links[address] = link
            return link

    def _inbound_from(self, address: str) -> InboundConnection | None:
        """The live connection that the node listening at ``address`` (by its record) opened to this
        node, if any."""
        for rec in self.membership.peers():
            if rec.address == address:
                conn = self._inbound.get(rec.node_id)
                if conn is not None and not conn.closed and conn.peer_fp.hex() == rec.cert_fp:
                    return conn
        return None

    def _on_inbound(self, conn: InboundConnection) -> None:
        """A peer connected to this node (its handshake passed): it is this node's connection to
        that peer too. If this node had opened one to it as well (both connected at once) and has
        the larger id, its own is retired: new frames take the peer's, and the old connection
        closes once what is in flight on it had time to arrive."""
        for nid, old in list(self._inbound.items()):
            if old.closed:
                del self._inbound[nid]
        self._inbound[conn.peer_node_id] = conn
        if conn.peer_node_id > self.s.node_id:
            return
        for link in list(self._links.values()):
            if link.conn is not conn and link.conn.peer_node_id == conn.peer_node_id:
                self._forget_link(link)
                self._retiring.add(link.conn)
                asyncio.get_running_loop().call_later(RETIRE_GRACE_S, self._retire, link.conn)

    def _retire(self, conn: PeerConnection | InboundConnection) -> None:
        if conn in self._retiring:
            self._retiring.discard(conn)
            self._spawn(conn.close())

    def connections(self) -> int:
        """The live QUIC connections this node holds to peers (opened by either end)."""
        live = {id(link.conn.protocol) for link in self._links.values() if not link.conn.closed}
        live.update(id(c.protocol) for c in [*self._inbound.values(), *self._retiring] if not c.closed)
        return len(live)

    async def _open(self, address: str, *, probe: bool = False, **options: Any) -> PeerConnection:
        """An authenticated connection to the node at ``address``, as this node (its id, key and
        certificate); with ``probe``, under a throwaway id and no certificate (see :meth:`_whois`)."""
        host, port = _address(address)
        if probe:
            node_id, cert = f"probe-{secrets.token_hex(4)}", None
        else:
            node_id, cert = self.s.node_id, self.server.cert
        return await PeerConnection.open(host, port, node_id=node_id, key=self.s.key, cert=cert, **options)

    def _forget_link(self, link: _Link) -> None:
        for addr, known in list(self._links.items()):
            if known is link:
                del self._links[addr]
        if link.reader is not None:
            link.reader.cancel()
        link.push.close()

    async def _drop_link(self, link: _Link) -> None:
        self._forget_link(link)
        await link.conn.close()

    async def _read_push_replies(self, address: str, link: _Link) -> None:
        """A push stream gets replies only when the receiver refused a frame; report them. When the
        receiver ends the stream (it does after a frame it could not even read, e.g. one over its
        ``max_frame_bytes``), the link is dropped: the next frame opens a new one."""
        while not self._closing:
            try:  # no timeout: a healthy link may go without a refusal for ever
                frame = await read_frame(link.push.reader, self.s.limits, timeout=None)
            except (WireError, ConnectionError, asyncio.IncompleteReadError):
                frame = None
            if frame is None:  # the receiver ended the stream (or the connection closed)
                break
            if frame.type == MessageType.ERROR:
                log.warning("%s refused a frame: %s", address, frame.meta.get("message"))
                self._refused_by(address, frame.meta)
        # A stream the receiver ended on a live connection: drop the link, so that the next frame
        # opens a new one. (A closed connection stays until a send fails on it: that fails fast.)
        if not self._closing and self._links.get(address) is link and not _quic.is_closed(link.conn.protocol):
            link.reader = None  # this task: not cancelled by _forget_link
            self._forget_link(link)
            await link.conn.close()

    def _refused_by(self, address: str, meta: dict[str, Any]) -> None:
        """The node at ``address`` refused a frame this node sent it: fail that step if this node is
        its origin or, when the refusal names no step (the frame could not even be read), every step
        this node sent there."""
        step = meta.get("step")
        code, message = str(meta.get("code", "error")), str(meta.get("message", ""))
        for s, p in list(self._pending.items()):
            first = p.route[0]
            if first.address == address and (step is None or step == s):
                why = f"hop {first.node_id} ({address}) refused the step's frame ({code}): {message}"
                self._fail(s, RouteFailedError(why, first.node_id))

    def _send_now(self, address: str, frame: Frame) -> bool:
        """Write a one-way frame at once if the link is open and has room; False: use :meth:`send`.

        Raises:
            TransportError: the link's connection is closed (the link is dropped).
        """
        link = self._links.get(address)
        if link is None or link.lock.locked():
            return False
        try:
            return link.push.send_nowait(frame)
        except (OSError, AttributeError) as exc:
            self._forget_link(link)
            self._spawn(link.conn.close())
            raise TransportError(f"cannot send to {address}: {exc}") from None

    async def send(self, address: str, frame: Frame) -> None:
        """Write a one-way frame to a node on its link's push stream (opening the link if needed)."""
        if self._send_now(address, frame):
            return
        link = await self._link(address)
        try:
            async with link.lock:
                await asyncio.wait_for(link.push.send(frame), self.s.step_timeout_s)
        except (OSError, TimeoutError, AttributeError) as exc:
            await self._drop_link(link)
            raise TransportError(f"cannot send to {address}: {exc}") from None

    async def request(self, address: str, frame: Frame, timeout: float) -> Frame:
        link = await self._link(address)
        try:
            return await link.conn.request(frame, timeout=timeout)
        except TransportError:
            await self._drop_link(link)
            raise

    # -------------------------------------------------------------------- gossip
    async def _exchange(self, address: str) -> bool:
        """One gossip exchange; True if the peer answered."""
        t0 = time.perf_counter()
        timeout = min(5.0, max(1.0, self.s.peer_timeout_s / 2))
        try:
            reply = await asyncio.wait_for(
                self.request(
                    address, Frame(MessageType.GOSSIP, {"records": self.records()}), timeout=timeout
                ),
                timeout=timeout,
            )
        except AuthError as exc:
            self._refusals.warn((address, "auth"), "cannot exchange records with %s: %s", address, exc)
            return False
        except (TransportError, LpipesError, TimeoutError, OSError) as exc:
            log.debug("gossip with %s failed: %s", address, exc)
            return False
        rtt = (time.perf_counter() - t0) * 1000.0
        records = reply.meta.get("records")
        link = self._links.get(address)
        if isinstance(records, list):
            # The replier's own record is first-hand: its id and certificate are the connection's.
            verified = None if link is None else (link.conn.peer_node_id, link.conn.peer_fp.hex())
            self.membership.merge(records, verified=verified)
            self._after_merge()
            if records and isinstance(records[0], dict) and isinstance(records[0].get("node_id"), str):
                nid = records[0]["node_id"]
                old = self._rtt_ms.get(nid)
                self._rtt_ms[nid] = rtt if old is None else 0.8 * old + 0.2 * rtt
        return True

    async def _gossip_loop(self) -> None:
        # Exchanges run as their own tasks: a dead peer's timeout never delays the next round (which
        # would let live peers' records go stale). One exchange per address at a time.
        inflight: set[str] = set()

        async def tracked(address: str) -> None:
            try:
                await self._exchange(address)
            finally:
                inflight.discard(address)

        while True:
            await asyncio.sleep(self.s.gossip_interval_s)
            peers = [r.address for r in self.membership.peers()]
            targets = {a for a in self.s.bootstrap if a != self.address}
            targets.update(random.sample(peers, min(3, len(peers))))
            for address in targets - inflight:
                inflight.add(address)
                self._spawn(tracked(address))
            for gone in self.membership.expire():
                self._rtt_ms.pop(gone, None)

    def link_ms(self, node_id: str) -> float | None:
        rtt = self._rtt_ms.get(node_id)
        return None if rtt is None else rtt / 2

    # ------------------------------------------------------------------ identity
    async def _identify(self, peer_id: str, fp: bytes) -> None:
        """The transport's identity check of a peer that proved it holds the certificate ``fp`` (and
        the network key): a client of this node's server, or the server of a link this node opens
        (whose frames come with that id too). A live node's id stays bound to its record's
        certificate: another certificate is accepted only when the record's address now presents it
        (the node restarted there). An id without a live record (new, or expired) is free to claim.

        Raises:
            AuthError: the id belongs to another live peer.
        """
        rec = self.membership.binding(peer_id)
        if rec is not None:
            if rec.cert_fp == fp.hex():
                return
            who = await self._whois(rec.address, (peer_id, fp))
            if who == (peer_id, fp):
                return
            raise AuthError(
                f"the peer claims the id {peer_id!r} of the live peer at {rec.address}, which "
                + ("does not answer" if who is None else "presents another certificate")
                + "; a restarted node is accepted once it listens at that address, or once the old "
                "record expired",
                "identity",
            )

    async def _whois(self, address: str, claim: tuple[str, bytes]) -> tuple[str, bytes] | None:
        """(node id, certificate fingerprint) that the node listening at ``address`` proves now, or
        None if it does not answer within ``PROBE_TIMEOUT_S``; asked to check ``claim`` (id,
        fingerprint). One probe per address at a time; the answer to the same claim is reused for
        ``PROBE_CACHE_S``."""
        lock = self._probe_locks.setdefault(address, asyncio.Lock())
        async with lock:
            cached = self._probes.get((address, *claim))
            if cached is not None and time.monotonic() - cached[0] < PROBE_CACHE_S:
                return cached[1]
            who: tuple[str, bytes] | None = None
            try:
                # Under a throwaway id: the answering node takes a connection under this node's id
                # for this node's link to it (and would give up the one this node's link uses).
                conn = await self._open(address, probe=True, handshake_timeout_s=PROBE_TIMEOUT_S)
            except (TransportError, LpipesError, OSError) as exc:
                log.info("probe of %s: %s", address, exc)
            else:
                who = (conn.peer_node_id, conn.peer_fp)
                await conn.close()
            if len(self._probes) > 1024:
                self._probes.clear()
            self._probes[(address, *claim)] = (time.monotonic(), who)
            return who

    def _after_merge(self) -> None:
        """After records came in: probe the addresses of records that rebind a live id (a restart
        heard of second-hand), and drop links to a process that no longer holds its address."""
        for rec in self.membership.take_unverified():
            self._spawn(self._verify_record(rec))
        fps: dict[str, set[str]] = {}
        for r in self.membership.peers():
            fps.setdefault(r.address, set()).add(r.cert_fp)
        for address, link in list(self._links.items()):
            known = fps.get(address)
            if (
                known
                and link.conn.peer_fp
                and link.conn.peer_fp.hex() not in known
                and not link.lock.locked()
            ):
                log.info("%s presents a new certificate now; reconnecting", address)
                self._forget_link(link)
                self._spawn(link.conn.close())

    async def _verify_record(self, rec: PeerRecord) -> None:
        claim = (rec.node_id, bytes.fromhex(rec.cert_fp))
        if await self._whois(rec.address, claim) == claim:
            self.membership.merge([rec.model_dump()], verified=(rec.node_id, rec.cert_fp))
            self._after_merge()

    def _forbidden(self, ctx: PeerContext, frame: Frame, why: str, **echo: Any) -> Frame:
        """Refuse a frame its authenticated sender may not send: a rate-limited warning and the
        ``forbidden`` ERROR reply."""
        self._refusals.warn(
            (ctx.peer_node_id, frame.type),
            "refusing a %s frame from %s: %s",
            frame.type.name,
            ctx.peer_node_id,
            why,
        )
        return error_frame(FORBIDDEN, why, **echo)

    # ------------------------------------------------------------------ handlers
    def _trace_frame(self, frame: Frame, ctx: PeerContext) -> None:
        if not self._trace:
            return
        entry = {
            "node": self.s.node_id,
            "from": ctx.peer_node_id,
            "type": frame.type.name,
            "meta": frame.meta,
            "tensors": {
                n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in frame.tensors.items()
            },
        }
        if frame.type == MessageType.FORWARD and "positions" in frame.tensors:
            entry["positions"] = frame.tensors["positions"].tolist()
        with self._trace_lock, open(self._trace, "ab") as f:
            f.write(orjson.dumps(entry, default=str) + b"\n")

    def _handle_now(self, frame: Frame, ctx: PeerContext) -> Frame | None:
        """The server's ``fast_handler``: a step's frames (and pings) handled in the receive callback;
        anything else is left to :meth:`_handle` (:data:`HANDLE_ASYNC`)."""
        t = frame.type
        if t not in _HANDLED_NOW:
            return HANDLE_ASYNC
        self._trace_frame(frame, ctx)
        if t == MessageType.FORWARD:
            self.busy_poll.disarm()
            return self._on_forward(frame, ctx)
        if t == MessageType.RESULT:
            self.busy_poll.disarm()  # the origin's engine takes over: leave it the CPU (and the GIL)
            return self._on_result(frame, ctx)
        if t == MessageType.ERROR:
            return self._on_error(frame, ctx)
        return Frame(MessageType.PONG, {"node_id": self.s.node_id, **self._progress(frame.meta)})

    async def _handle(self, frame: Frame, ctx: PeerContext) -> Frame | None:
        reply = self._handle_now(frame, ctx)
        if reply is not HANDLE_ASYNC:
            return reply
        self._trace_frame(frame, ctx)
        t = frame.type
        if t == MessageType.GOSSIP:
            records = frame.meta.get("records", [])
            if not isinstance(records, list) or len(records) > 4096:
                raise WireError("GOSSIP: records must be a list of at most 4096 peer records")
            self.membership.merge(records, verified=(ctx.peer_node_id, ctx.peer_fp.hex()))
            self._after_merge()
            seen = {r.node_id: self.membership.last_seen(r.node_id) for r in self.membership.peers()}
            return Frame(MessageType.GOSSIP, {"records": self.records(), "last_seen_s": seen})
        if t == MessageType.END_SESSION:
            return await self._on_end(frame, ctx)
        raise WireError(f"unexpected {t.name} frame")

    # ---------------------------------------------------------------- layer peer
    def _check_forward(
        self, frame: Frame
    ) -> tuple[ForwardMeta, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        meta = _parse(ForwardMeta, frame)
        extra = set(frame.tensors) - {"hidden", "positions", "per_layer"}
        if extra:
            raise WireError(f"FORWARD: unexpected tensors {sorted(extra)}")
        if len(meta.lens) != len(meta.sessions) or len(set(meta.sessions)) != len(meta.sessions):
            raise WireError("FORWARD: sessions must be unique and match lens one to one")
        if meta.hop >= len(meta.route):
            raise WireError(f"FORWARD: hop {meta.hop} is past the route's {len(meta.route)} hops")
        total = sum(meta.lens)
        hidden = check_tensor(
            frame,
            "hidden",
            dtypes=HIDDEN_DTYPES,
            shape=(total, self.s.hidden_size),
        )
        positions = check_tensor(frame, "positions", dtypes=(torch.int64,), shape=(total,))
        per_layer = None
        if "per_layer" in frame.tensors:
            per_layer = check_tensor(
                frame,
                "per_layer",
                dtypes=HIDDEN_DTYPES,
                shape=(total, None, None),
            )
        return meta, hidden, positions, per_layer

    def _on_forward(self, frame: Frame, ctx: PeerContext) -> Frame | None:
        meta, hidden, positions, per_layer = self._check_forward(frame)
        # Who may send it: the origin itself to the first hop, else the hop before this one. (A
        # refusal is the reply on the sender's stream, never a report to reply_to, which the frame
        # names and so an unauthorised sender would choose.)
        sender = meta.origin if meta.hop == 0 else meta.route[meta.hop - 1].node_id
        if ctx.peer_node_id != sender:
            rule = "the first hop takes it from its origin" if meta.hop == 0 else "it must come from hop"
            return self._forbidden(
                ctx,
                frame,
                f"FORWARD of step {meta.step} (origin {meta.origin!r}, hop {meta.hop}) came from "
                f"{ctx.peer_node_id!r}, but {rule} {sender!r} only",
                step=meta.step,
            )
        hop = meta.route[meta.hop]
        try:
            if hop.node_id != self.s.node_id or (hop.start, hop.end) != self.span:
                raise PeerStepError(
                    f"node {self.s.node_id} runs layers [{self.span[0]}, {self.span[1]}), "
                    f"but the route asked it for {hop.node_id} [{hop.start}, {hop.end})"
                )
            if self.executor is None or not self.ready:
                raise PeerStepError(f"node {self.s.node_id} is not ready (still loading its layers)")
            n_here = hop.end - hop.start
            if per_layer is not None and per_layer.shape[1] < n_here:
                raise WireError("FORWARD: per_layer covers fewer layers than this hop runs")
            keys = [f"{meta.origin}.{sid}" for sid in meta.sessions]
            new = sum(1 for k in keys if k not in self._sessions)
            if new and len(self._sessions) + new > self.s.max_sessions:
                raise SessionLimitError(
                    f"node {self.s.node_id} holds {len(self._sessions)} sessions and this step would open "
                    f"{new} more, over its max_sessions = {self.s.max_sessions}"
                )
        except (LpipesError, ValueError) as exc:
            code = "bad_frame" if isinstance(exc, WireError) else type(exc).__name__
            self._spawn(self._report(meta, code, str(exc)))
            return None
        inputs = []
        off = 0
        for key, n in zip(keys, meta.lens):
            ple = None if per_layer is None else per_layer[off : off + n, :n_here]
            inputs.append(SequenceInput(key, hidden[off : off + n], positions[off : off + n], ple))
            off += n
        now = time.monotonic()
        for key in keys:
            self._sessions[key] = now
        self._log_step(meta, "queued")
        self._queue.append(_Job(frame, meta, inputs, positions, per_layer))
        if not self._kick_pending and not self._batch_running:
            # Not run here: every FORWARD of the received burst (else of this loop iteration) queues
            # first, and the kick runs them as one batch.
            self._kick_pending = True
            if not _quic.call_after_burst(self._kick):
                asyncio.get_running_loop().call_soon(self._kick)
        return None

    # ------------------------------------------------------------- peer batching
    def _take_batch(self) -> list[_Job]:
        """The longest prefix of the queue within ``PEER_BATCH_TOKENS`` (at least one job) whose
        sessions are all distinct (a session's steps run in order)."""
        batch: list[_Job] = []
        seen: set[str] = set()
        tokens = 0
        while self._queue:
            job = self._queue[0]
            keys = {x.session_id for x in job.inputs}
            if batch and (tokens + job.tokens > PEER_BATCH_TOKENS or keys & seen):
                break
            batch.append(self._queue.popleft())
            seen |= keys
            tokens += job.tokens
        return batch

    def _kick(self) -> None:
        """Run the queued steps: a small batch right here on the loop thread when nothing else
        computes (see ``INLINE_MAX_TOKENS``), else on the compute thread, batch after batch."""
        self._kick_pending = False
        if self._batch_running or not self._queue:
            return
        batch = self._take_batch()
        if self._inline(sum(j.tokens for j in batch), self.span[1] - self.span[0]):
            self._deliver(batch, self._run_batch(batch))
            if self._queue and not self._kick_pending:
                self._kick_pending = True
                asyncio.get_running_loop().call_soon(self._kick)
            return
        self._batch_running = True
        self._spawn(self._run_queue(batch))

    async def _run_queue(self, batch: list[_Job]) -> None:
        try:
            while batch:
                self.busy_poll.disarm()  # the compute thread needs the GIL between its kernels
                self._deliver(batch, await self._computed(self._run_batch, batch))
                batch = self._take_batch()
        finally:
            self._batch_running = False

    def _run_batch(self, batch: list[_Job]) -> list[torch.Tensor | BaseException]:
        """Every job's output (its sessions' hidden states, concatenated), or the error it raised.
        One executor call for the whole batch; if that fails, each job alone (so one bad session
        fails only its own step)."""
        self.batches += 1
        self.batched_jobs += len(batch)
        if len(batch) > 1:
            try:
                outs = self._run_span([x for j in batch for x in j.inputs])
            except Exception:  # noqa: BLE001 - retried job by job below, where it is reported
                pass
            else:
                parts, off = [], 0
                for j in batch:
                    parts.append(outs[off : off + j.tokens])
                    off += j.tokens
                return parts
        results: list[torch.Tensor | BaseException] = []
        for j in batch:
            try:
                results.append(self._run_span(j.inputs))
            except Exception as exc:  # noqa: BLE001 - reported to the step's origin, the peer goes on
                if not isinstance(exc, (LpipesError, ValueError, RuntimeError)):
                    log.exception("step %d failed here unexpectedly", j.meta.step)
                results.append(exc)
        return results

    def _deliver(self, batch: list[_Job], results: list[torch.Tensor | BaseException]) -> None:
        """Send each job's output to its next hop (or its origin), or report its error."""
        for job, out in zip(batch, results):
            meta = job.meta
            if isinstance(out, BaseException):
                code = "bad_frame" if isinstance(out, WireError) else type(out).__name__
                self._spawn(self._report(meta, code, str(out)))
                continue
            if meta.hop + 1 < len(meta.route):
                nxt = meta.route[meta.hop + 1]
                tensors = {"hidden": out, "positions": job.positions}
                if job.per_layer is not None:
                    here = meta.route[meta.hop]
                    tensors["per_layer"] = job.per_layer[:, here.end - here.start :].contiguous()
                # The same metadata (it passed ForwardMeta), addressed to the next hop.
                frame = Frame(MessageType.FORWARD, {**job.frame.meta, "hop": meta.hop + 1}, tensors)
                address, failed = nxt.address, nxt.node_id
            else:
                frame = Frame(
                    MessageType.RESULT,
                    {"step": meta.step, "sessions": meta.sessions, "lens": meta.lens},
                    {"hidden": out},
                )
                address, failed = meta.reply_to, None
            if self.faults.delay_ms > 0:
                self.loop.call_later(  # type: ignore[union-attr]
                    self.faults.delay_ms / 1000.0, self._post, address, frame, meta, failed
                )
            else:
                self._post(address, frame, meta, failed)

    def _post(self, address: str, frame: Frame, meta: ForwardMeta, failed: str | None) -> None:
        """Send a step's frame now if the link has room, else from a task; a failure is reported to
        the step's origin (a lost origin is only logged: nobody is left to tell)."""
        self._passed_on += 1
        if self.faults.cut_after and self._passed_on % (self.faults.cut_after + 1) == 0:
            if self._cut(address, frame):
                self._log_step(meta, "sent", frame)
                return
        try:
            if self._send_now(address, frame):
                self._log_step(meta, "sent", frame)
                self.busy_poll.arm()
                return
        except TransportError as exc:
            self._spawn(self._post_failed(address, meta, failed, exc))
            return
        self._spawn(self._post_later(address, frame, meta, failed))

    async def _post_later(self, address: str, frame: Frame, meta: ForwardMeta, failed: str | None) -> None:
        try:
            await self.send(address, frame)
        except (TransportError, LpipesError) as exc:
            await self._post_failed(address, meta, failed, exc)
        else:
            self._log_step(meta, "sent", frame)
            self.busy_poll.arm()

    def _cut(self, address: str, frame: Frame) -> bool:
        """The ``cut_after`` fault: half of ``frame`` on the link, then the link's connection dropped."""
        link = self._links.get(address)
        if link is None:
            return False
        data = encode_bytes(frame, self.s.limits)
        log.warning("fault injection: dropping the link to %s mid-frame", address)
        with contextlib.suppress(Exception):
            link.push.writer.write(bytes(data[: len(data) // 2]))
        self._forget_link(link)
        self._spawn(link.conn.close())
        return True

    # ------------------------------------------------------------ step progress
    def _log_step(self, meta: ForwardMeta, state: str, frame: Frame | None = None) -> None:
        size = 0 if frame is None else sum(t.nbytes for t in frame.tensors.values())
        key = (meta.origin, meta.step)
        self._step_log[key] = (state, time.monotonic(), size)
        self._step_log.move_to_end(key)
        while len(self._step_log) > STEP_LOG_SIZE:
            self._step_log.popitem(last=False)

    def _progress(self, meta: dict[str, Any]) -> dict[str, Any]:
        """A PING's answer about the steps it names (``origin``, ``steps``): for each, ``none`` (never
        received), ``queued`` (received, not passed on yet) or ``sent``, with the seconds since then
        and the bytes passed on."""
        origin, steps = meta.get("origin"), meta.get("steps")
        if not isinstance(origin, str) or not isinstance(steps, list):
            return {}
        out: dict[str, list[Any]] = {}
        now = time.monotonic()
        for step in steps[:64]:
            if isinstance(step, int) and not isinstance(step, bool):
                state, t, size = self._step_log.get((origin, step), ("none", now, 0))
                out[str(step)] = [state, round(now - t, 3), size]
        return {"steps": out}

    async def _post_failed(self, address: str, meta: ForwardMeta, failed: str | None, exc: Exception) -> None:
        if failed is None:
            log.warning("cannot return step %d to origin %s: %s", meta.step, meta.origin, exc)
        else:
            await self._report(meta, "hop_failed", f"{failed} unreachable: {exc}", failed=failed)

    def _inline(self, tokens: int, layers: int) -> bool:
        """Run this step on the loop thread (see ``INLINE_MAX_TOKENS``)?"""
        return (
            tokens <= INLINE_MAX_TOKENS
            and self._compute_jobs == 0
            and self.ms_per_layer * layers <= INLINE_MAX_MS
        )

    async def _computed(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the compute thread (one call at a time, in order)."""
        self._compute_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)
        finally:
            self._compute_jobs -= 1

    def _run_span(self, inputs: list[SequenceInput]) -> torch.Tensor:
        t0 = time.perf_counter()
        outs = self.executor.forward(inputs)
        dt = time.perf_counter() - t0
        tokens = sum(x.hidden.shape[0] for x in inputs)
        if tokens <= INLINE_MAX_TOKENS:  # decode-sized steps: what routing cares about
            n = max(1, self.span[1] - self.span[0])
            ms = dt * 1000.0 / n
            self.ms_per_layer = ms if self.ms_per_layer == 0 else 0.9 * self.ms_per_layer + 0.1 * ms
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    async def _report(self, meta: ForwardMeta, code: str, message: str, **extra: Any) -> None:
        log.info("step %d failed here: %s", meta.step, message)
        err = error_frame(code, message, step=meta.step, node_id=self.s.node_id, **extra)
        with contextlib.suppress(TransportError, LpipesError):
            await self.send(meta.reply_to, err)

    async def _on_end(self, frame: Frame, ctx: PeerContext) -> Frame | None:
        meta = _parse(EndMeta, frame)
        if ctx.peer_node_id != meta.origin:
            return self._forbidden(
                ctx,
                frame,
                f"END_SESSION of {len(meta.sessions)} session(s) of origin {meta.origin!r} came from "
                f"{ctx.peer_node_id!r}: only a session's origin ends it",
            )
        keys = [f"{meta.origin}.{sid}" for sid in meta.sessions]
        for key in keys:
            self._sessions.pop(key, None)
        if self.executor is not None:
            await self._computed(self._end_sessions, keys)
        return None

    def _end_sessions(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(SessionError):
                self.executor.end_session(key)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_S, self.s.session_timeout_s))
            now = time.monotonic()
            idle = [k for k, t in self._sessions.items() if now - t > self.s.session_timeout_s]
            for k in idle:
                del self._sessions[k]
            if idle and self.executor is not None:
                log.info("ending %d idle session(s)", len(idle))
                await self._computed(self._end_sessions, idle)

    # -------------------------------------------------------------------- origin
    def _on_result(self, frame: Frame, ctx: PeerContext) -> Frame | None:
        meta = _parse(ResultMeta, frame)
        p = self._pending.get(meta.step)
        if p is None:
            return None  # a step that already failed over
        last = p.route[-1].node_id
        if ctx.peer_node_id != last or meta.sessions != p.sessions:
            return self._forbidden(
                ctx,
                frame,
                f"RESULT of step {meta.step} came from {ctx.peer_node_id!r}: only the last hop of its "
                f"route, {last!r}, returns it, for the step's own sessions",
            )
        hidden = check_tensor(
            frame,
            "hidden",
            dtypes=HIDDEN_DTYPES,
            shape=(sum(meta.lens), self.s.hidden_size),
        )
        self._pending.pop(meta.step, None)
        if p.timer is not None:
            p.timer.cancel()
        p.future.set_result(hidden)
        return None

    def _on_error(self, frame: Frame, ctx: PeerContext) -> Frame | None:
        """A hop's report that a step failed. Only a hop of that step's route may fail it, and the
        node marked is the sender itself or, for ``hop_failed``, the hop right after it (the only one
        it sends to), so no report can get an unrelated node marked."""
        step = frame.meta.get("step")
        p = self._pending.get(step) if isinstance(step, int) else None
        if p is None:
            return None  # a step that already failed over, or none of this node's
        ids = [h.node_id for h in p.route]
        sender = ctx.peer_node_id
        if sender not in ids:
            return self._forbidden(
                ctx,
                frame,
                f"ERROR for step {step} came from {sender!r}, which is not a hop of its route {ids}",
            )
        code = str(frame.meta.get("code", "error"))
        message = str(frame.meta.get("message", ""))
        node = sender
        i = ids.index(sender)
        if code == "hop_failed" and i + 1 < len(ids) and frame.meta.get("failed") == ids[i + 1]:
            node = ids[i + 1]
        # Any hop failure reroutes (the next route may not have the problem); MAX_FAILOVERS bounds it.
        # A full hop is healthy: it is not marked (that would take it off every route for a while).
        full = code in CAPACITY_ERRORS
        self._fail(step, RouteFailedError(f"{node} failed the step ({code}): {message}", node, capacity=full))
        return None

    def _fail(self, step: int, exc: BaseException) -> None:
        """Complete an outstanding step with ``exc``; a failed peer named by it is marked."""
        p = self._pending.pop(step, None)
        if p is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        if isinstance(exc, RouteFailedError) and exc.node_id is not None and not exc.capacity:
            self.membership.mark(exc.node_id, str(exc))
        p.future.set_exception(exc)

    def begin_step(
        self,
        route: list[Hop],
        sessions: list[str],
        lens: list[int],
        tensors: dict[str, torch.Tensor],
        future: concurrent.futures.Future,
    ) -> None:
        """Send one step along ``route``; ``future`` gets the last hop's hidden states or the
        :class:`RouteFailedError` that ended the step (see the module docs). Call on the node's loop.

        A decode step leaves in this call (``_send_now``), and the result completes ``future`` in the
        RESULT frame's handler: no task, no thread hop on the loop's side.
        """
        step = next(self._steps)
        first = route[0]
        try:
            meta = {
                "step": step,
                "origin": self.s.node_id,
                "reply_to": self.address,
                "sessions": sessions,
                "lens": lens,
                "route": [h.to_json() for h in route],
                "hop": 0,
            }
            frame = Frame(MessageType.FORWARD, meta, tensors)
            size = sum(t.nbytes for t in tensors.values())
            self._pending[step] = p = _Pending(
                future, route, time.monotonic(), size=size, sessions=list(sessions)
            )
            p.timer = self.loop.call_later(HEARTBEAT_S, self._heartbeat, step)  # type: ignore[union-attr]
            if self._send_now(first.address, frame):
                self.busy_poll.arm()
            else:
                self._spawn(self._send_step(step, first, frame))
        except TransportError as exc:
            self._fail(step, RouteFailedError(f"hop {first.node_id} unreachable: {exc}", first.node_id))
        except BaseException as exc:  # noqa: BLE001 - the engine thread waits on this future
            self._pending.pop(step, None)
            if not future.done():
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def _send_step(self, step: int, first: Hop, frame: Frame) -> None:
        try:
            await self.send(first.address, frame)
        except (TransportError, LpipesError, OSError) as exc:
            self._fail(step, RouteFailedError(f"hop {first.node_id} unreachable: {exc}", first.node_id))
        else:
            self.busy_poll.arm()

    def _heartbeat(self, step: int) -> None:
        p = self._pending.get(step)
        if p is None:
            return
        p.timer = None
        if time.monotonic() - p.started > self.s.step_timeout_s:
            self._fail(
                step, RouteFailedError(f"no result within step_timeout_s = {self.s.step_timeout_s:g} s")
            )
            return
        self._spawn(self._check_step(step, p))

    async def _check_step(self, step: int, p: _Pending) -> None:
        """Ping every hop of an outstanding step; fail it on a silent hop or when a hop passed it on
        but the next never received it (see ``LOST_GRACE_S``), else check again later."""
        try:
            replies = await self._check_hops(p.route, step)
            lost = _lost_between(p, step, replies)
            if lost is not None:
                raise lost
        except RouteFailedError as exc:
            self._fail(step, exc)
            return
        if self._pending.get(step) is p:
            p.timer = asyncio.get_running_loop().call_later(HEARTBEAT_S, self._heartbeat, step)

    async def run_step(
        self, route: list[Hop], sessions: list[str], lens: list[int], tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """:meth:`begin_step` for a caller on the node's loop."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.begin_step(route, sessions, lens, tensors, future)
        return await asyncio.wrap_future(future)

    async def _check_hops(self, route: list[Hop], step: int | None = None) -> list[Frame]:
        """Ping every hop (asking about ``step``); their PONGs in route order, or the
        :class:`RouteFailedError` of a hop that did not answer."""
        meta = {} if step is None else {"origin": self.s.node_id, "steps": [step]}

        async def ping(h: Hop) -> Frame:
            try:
                reply = await asyncio.wait_for(
                    self.request(h.address, Frame(MessageType.PING, meta), timeout=PING_TIMEOUT_S),
                    PING_TIMEOUT_S,
                )
            except (TransportError, LpipesError, TimeoutError, OSError) as exc:
                why = str(exc) or f"no answer to a ping within {PING_TIMEOUT_S:g} s"
                raise RouteFailedError(
                    f"hop {h.node_id} ({h.address}) stopped answering: {why}", h.node_id
                ) from None
            if reply.type != MessageType.PONG:
                raise RouteFailedError(f"hop {h.node_id} answered a ping with {reply.type.name}", h.node_id)
            if reply.meta.get("node_id") != h.node_id:
                raise RouteFailedError(
                    f"hop {h.node_id}'s address {h.address} answers as {reply.meta.get('node_id')!r} now",
                    h.node_id,
                )
            return reply

        results = await asyncio.gather(*(ping(h) for h in route), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def end_sessions(self, route: list[Hop], sessions: list[str]) -> None:
        frame = Frame(MessageType.END_SESSION, {"origin": self.s.node_id, "sessions": sessions})
        for h in route:
            with contextlib.suppress(TransportError, LpipesError, OSError, TimeoutError):
                await asyncio.wait_for(self.send(h.address, frame), 5.0)

    def end_sessions_now(self, route: list[Hop], sessions: list[str]) -> None:
        """:meth:`end_sessions` from a loop callback: each hop's ``END_SESSION`` is written at once
        where its link has room, so it leaves before any step begun after it (a preempted session's
        blocks are free at the first hop before the batch that counted them free arrives); the
        others from a task."""
        frame = Frame(MessageType.END_SESSION, {"origin": self.s.node_id, "sessions": sessions})
        late = []
        for h in route:
            try:
                if not self._send_now(h.address, frame):
                    late.append(h)
            except TransportError:
                pass  # the link is gone: so is the hop's session, or its sweep frees it
        if late:
            self._spawn(self.end_sessions(late, sessions))


def _lost_between(p: _Pending, step: int, replies: list[Frame]) -> RouteFailedError | None:
    """The error for ``step`` if a hop (or the origin) passed it on long enough ago while the next
    hop reports never having received it; None while it may still be on its way."""
    key = str(step)
    prev_state, prev_age, prev_bytes = "sent", time.monotonic() - p.started, p.size
    prev_name = "the origin"
    for hop, reply in zip(p.route, replies):
        steps = reply.meta.get("steps")
        entry = steps.get(key) if isinstance(steps, dict) else None
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and entry[0] in ("none", "queued", "sent")
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry[1:])
        ):
            return None  # a hop that does not report (valid) progress: only liveness is known
        state, age, size = entry
        allowance = LOST_GRACE_S + prev_bytes / (LOST_MIN_MBPS * 1e6)
        if state == "none" and prev_state == "sent" and prev_age > allowance:
            return RouteFailedError(
                f"step lost between {prev_name} and hop {hop.node_id}: passed on {prev_age:.1f} s ago, "
                "never received",
                hop.node_id,
            )
        prev_state, prev_age, prev_bytes, prev_name = state, float(age), int(size), f"hop {hop.node_id}"
    if prev_state == "sent" and prev_age > 2 * LOST_GRACE_S + prev_bytes / (LOST_MIN_MBPS * 1e6):
        # The last hop sent its RESULT, which never arrived (or arrived after the step failed over).
        return RouteFailedError(f"the result of step {step} was lost on its way back from {prev_name}")
    return None


class RemoteStage:
    """The origin's stage for layers ``[start, end)`` run by other nodes (the generation loop's
    :class:`~lpipes.generation.loop.Stage`). Called from the engine thread; the network work runs on
    the node's event loop.

    The route is kept while it works (every session's KV lives on its hops); when a hop fails the
    route is dropped and :class:`RouteFailedError` tells the engine to replay its sessions, which
    then travel the next cheapest route.
    """

    def __init__(self, node: Node, start: int, end: int) -> None:
        self.node = node
        self.start = start
        self.end = end
        self.route: list[Hop] | None = None
        # session id -> (its id on the wire, its route). A session's wire id changes each time it
        # starts again (a replay after failover): a late END_SESSION of the old one cannot end it.
        self._sessions: dict[str, tuple[str, list[Hop]]] = {}
        self._tokens: dict[str, int] = {}  # session id -> tokens sent to its route (KV it holds there)
        self._incarnation = itertools.count(1)
        self._lock = threading.Lock()

    def plan(self) -> list[Hop]:
        peers = [p for p in self.node.membership.routable(self.node.s.model_hash) if not p.end_model]
        return plan_route(self.start, self.end, peers, link_ms=self.node.link_ms)

    def _current_route(self) -> list[Hop]:
        with self._lock:
            if self.route is not None:
                m = self.node.membership
                gone = [h.node_id for h in self.route if m.get(h.node_id) is None or m.is_marked(h.node_id)]
                if not gone:
                    return self.route
                self.route = None
                if self._sessions:
                    raise RouteFailedError(f"peer {gone[0]} left the network", None)
            self.route = self.plan()
            log.info(
                "route for layers [%d, %d): %s",
                self.start,
                self.end,
                " → ".join(f"{h.node_id}[{h.start},{h.end})" for h in self.route),
            )
            return self.route

    def forward(self, inputs: Sequence[SequenceInput]) -> list[torch.Tensor]:
        # The loop completes the step within step_timeout_s (heartbeats, timeout); the margin here only
        # guards against a loop that stopped running.
        wait_s = self.node.s.step_timeout_s + 4 * (HEARTBEAT_S + PING_TIMEOUT_S)
        fut = self.forward_async(inputs)
        try:
            return fut.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self.route = None
            raise RouteFailedError(f"the node's event loop gave no answer within {wait_s:g} s") from None

    def forward_async(self, inputs: Sequence[SequenceInput]) -> concurrent.futures.Future:
        """Start the step on the node's loop; the future gets each session's output (the inputs'
        dtype), or the :class:`RouteFailedError` that ended the step (the route is then dropped)."""
        loop = self.node.loop
        if loop is None:
            raise NoRouteError("the node's network is not running")
        route = self._current_route()
        lens = [int(x.hidden.shape[0]) for x in inputs]
        sessions = []
        for x in inputs:
            known = self._sessions.get(x.session_id)
            wire_id = known[0] if known is not None else f"{x.session_id}.{next(self._incarnation)}"
            self._sessions[x.session_id] = (wire_id, route)
            held = 0 if known is None else self._tokens.get(x.session_id, 0)  # a new incarnation: none
            self._tokens[x.session_id] = held + int(x.hidden.shape[0])
            sessions.append(wire_id)
        tensors = {
            "hidden": torch.cat([x.hidden for x in inputs]).contiguous(),
            "positions": torch.cat([x.positions for x in inputs]).to(torch.int64).contiguous(),
        }
        if inputs[0].per_layer is not None:
            tensors["per_layer"] = torch.cat([x.per_layer for x in inputs]).contiguous()
        dtype = inputs[0].hidden.dtype
        step: concurrent.futures.Future = concurrent.futures.Future()
        out: concurrent.futures.Future = concurrent.futures.Future()

        def done(f: concurrent.futures.Future) -> None:  # on the loop thread
            exc = f.exception()
            if exc is None:
                try:
                    out.set_result([h.to(dtype) for h in f.result().split(lens)])
                except Exception as err:  # noqa: BLE001 - the waiting engine gets it
                    out.set_exception(err)
                return
            if isinstance(exc, RouteFailedError):
                with self._lock:
                    self.route = None
            out.set_exception(exc)

        step.add_done_callback(done)
        loop.call_soon_threadsafe(self.node.begin_step, route, sessions, lens, tensors, step)
        return out

    def end_session(self, session_id: str) -> None:
        known = self._sessions.pop(session_id, None)
        self._tokens.pop(session_id, None)
        loop = self.node.loop
        if known is None or loop is None or loop.is_closed():
            return
        wire_id, route = known
        loop.call_soon_threadsafe(self.node.end_sessions_now, route, [wire_id])

    def kv_pools(self) -> list[RemotePool]:
        """The KV pools of the route's hops (the current route, or the one a step would take now),
        as the engine's admission sees them; empty when no route can be planned. Called from the
        engine thread."""
        route = self.route
        if route is None:
            try:
                route = self.plan()
            except LpipesError:
                return []
        m = self.node.membership
        shared = any(p.end_model for p in m.routable(self.node.s.model_hash))  # another origin
        pools = []
        for hop in route:
            rec = m.get(hop.node_id)
            if rec is not None and rec.kv_blocks_total > 0:
                pools.append(RemotePool(rec, self._tokens, shared=shared))
        return pools


class RemotePool:
    """A layer peer's KV pool as an origin's engine sees it (the interface of
    :class:`~lpipes.runtime.paged.PagedKVCache` that the engine reads): the size the peer gossiped,
    this origin's own sessions on it counted exactly and, when another origin shares the network
    (``shared``), the peer's reported use where it is higher (a report is up to a gossip round old)."""

    def __init__(self, record: PeerRecord, tokens: dict[str, int], *, shared: bool) -> None:
        self.node_id = record.node_id
        self.block_size = record.kv_block_tokens
        self.blocks_total = record.kv_blocks_total
        self._tokens = tokens
        used = sum(-(-n // self.block_size) for n in list(tokens.values()))
        if shared:
            used = max(used, record.kv_blocks_used)
        self.blocks_free = max(0, self.blocks_total - used)

    def capacity(self, session_id: str) -> int:
        """Token positions the session's blocks hold on the peer (0: none)."""
        return -(-self._tokens.get(session_id, 0) // self.block_size) * self.block_size

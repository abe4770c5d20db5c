"""Security and network limits of the peer network, over real QUIC on 127.0.0.1.

In-process nodes on one event loop (no model processes needed): a replayed handshake, a missing key on
either side, node ids claimed by someone else (the server's own id, a live peer's id, forged gossip),
while a restarted peer still rejoins at once; frames for sessions the sender does not own; and the
limits: ``max_sessions``, ``max_frame_bytes`` (refused from the header, before the body is allocated)
and the idle session TTL (``session_timeout_s``). Every attack checks the refusal, its log line, and
that the attacked node goes on serving legitimate traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time

import pytest
import torch
from netharness import in_process_node

from lpipes.errors import RouteFailedError
from lpipes.models.checkpoint import open_checkpoint
from lpipes.net import _quic
from lpipes.net.auth import AuthError, new_nonce, proof, transcript
from lpipes.net.tls import make_certificate
from lpipes.net.transport import PeerConnection, PeerErrorReply, quic_configuration, read_frame, write_frame
from lpipes.node import TRACE_ENV, Node
from lpipes.runtime.local import make_executor
from lpipes.runtime.reference import SequenceInput
from lpipes.swarm.planning import Hop, plan_route
from lpipes.swarm.records import PeerRecord, sign_record
from lpipes.wire import HEADER_BYTES, Frame, MessageType, WireLimits, decode, encode_bytes, frame_length

HASH = "ab" * 16
HIDDEN = 64  # the tiny checkpoints' hidden size
TIMEOUT_S = 60


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def _node(node_id: str, key: bytes | None, *, bootstrap: tuple[str, ...] = (), **settings) -> Node:
    return in_process_node(node_id, key, bootstrap=bootstrap, model_hash=HASH, hidden_size=HIDDEN, **settings)


@pytest.fixture(scope="module")
def span(tiny_checkpoint):
    """``span(start, end)``: a fresh float32 reference executor of the tiny qwen3 for those layers."""
    path = tiny_checkpoint("qwen3")

    def make(start: int, end: int):
        ckpt = open_checkpoint(path, layers=(start, end), end_model=False)
        return make_executor(
            ckpt, start, end, dtype=torch.float32, executor="reference", kv_cache_bytes=1 << 22
        )

    return make


def _serve(node: Node, executor, span: tuple[int, int]) -> None:
    node.executor, node.span, node.ready = executor, span, True


def _step(x: torch.Tensor, start: int = 0) -> dict[str, torch.Tensor]:
    return {"hidden": x, "positions": torch.arange(start, start + x.shape[0])}


def _address(node: Node) -> tuple[str, int]:
    host, _, port = node.address.rpartition(":")
    return host, int(port)


def _logged(caplog, text: str, level: int = logging.WARNING) -> list[str]:
    """Log lines containing ``text`` at ``level`` or above (refusals after the first of their kind
    within a minute are rate-limited to debug level)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


async def _raw_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(HEADER_BYTES)
    return header + await reader.readexactly(frame_length(header) - HEADER_BYTES)


async def _next_frame(reader: asyncio.StreamReader, timeout: float) -> Frame | None:
    """The next frame of a stream, or None when the stream or connection ends or nothing comes."""
    with contextlib.suppress(Exception):
        return await read_frame(reader, timeout=timeout)
    return None


async def _closed(protocol, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _quic.is_closed(protocol):
            return True
        await asyncio.sleep(0.05)
    return False


# ------------------------------------------------------------------------------ handshake
async def _recorder(key: bytes, claim_id: str):
    """A key holder's QUIC server that runs the server side of the handshake (claiming ``claim_id``)
    and records the client's two HELLO frames byte for byte."""
    cert = make_certificate(claim_id)
    recorded: list[bytes] = []
    tasks: set[asyncio.Task] = set()

    async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        recorded.append(await _raw_frame(reader))
        hello = decode(bytearray(recorded[0]))
        nonce_s = new_nonce()
        t = transcript(hello.meta["nonce"], nonce_s, hello.meta["node_id"], claim_id, cert.fingerprint)
        welcome = {"node_id": claim_id, "nonce": nonce_s, "proof": proof(key, "server", t)}
        await write_frame(writer, Frame(MessageType.WELCOME, welcome))
        recorded.append(await _raw_frame(reader))
        await write_frame(writer, Frame(MessageType.WELCOME, {"ok": True}))
        writer.write_eof()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not recorded:
            task = asyncio.ensure_future(handshake(reader, writer))
            tasks.add(task)

    server = await _quic.serve(
        "127.0.0.1",
        0,
        configuration=quic_configuration(is_client=False, cert=cert),
        stream_handler=on_stream,
    )
    port = server._transport.get_extra_info("socket").getsockname()[1]
    return server, recorded, port


async def _replay(target: Node, hellos: list[bytes]) -> tuple[Frame | None, Frame | None, Frame | None, bool]:
    """Replay two HELLO frames to ``target`` on a fresh connection, a PING right behind the second and
    another on a second stream; returns (reply to the second HELLO, what followed on that stream, the
    second stream's reply, whether the connection was closed within 3 s)."""
    ping = bytes(encode_bytes(Frame(MessageType.PING)))
    host, port = _address(target)
    async with _quic.connect(host, port, configuration=quic_configuration(is_client=True)) as protocol:
        reader, writer = await protocol.create_stream()
        other_reader, other_writer = None, None
        try:
            writer.write(hellos[0])
            welcome = await read_frame(reader, timeout=10)
            assert welcome is not None and welcome.type == MessageType.WELCOME
            writer.write(hellos[1] + ping)
            other_reader, other_writer = await protocol.create_stream()
            other_writer.write(ping)
            reply = await _next_frame(reader, 10)
            after = await _next_frame(reader, 2)
            other = await _next_frame(other_reader, 2)
            return reply, after, other, await _closed(protocol, 3)
        finally:
            for w in (writer, other_writer):
                with contextlib.suppress(Exception):
                    if w is not None:
                        w.write_eof()


def test_a_replayed_handshake_is_refused_and_the_node_keeps_serving(monkeypatch, tmp_path, caplog):
    trace = tmp_path / "frames.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)

    async def scenario() -> None:
        target = _node("target", key)
        await target.start()
        recorder, recorded, port = await _recorder(key, "target")
        try:
            # A legitimate node's handshake with a key holder, recorded byte for byte ...
            conn = await PeerConnection.open("127.0.0.1", port, node_id="peer-a", key=key)
            await conn.close()
            assert len(recorded) == 2
            # ... replayed to the target: the proofs covered the recorder's nonce and certificate.
            reply, after, other, closed = await _replay(target, recorded)
            assert reply is not None and reply.type == MessageType.ERROR, reply
            assert reply.meta["code"] == "unauthenticated"
            assert after is None and other is None and closed  # nothing behind it was answered
            # The same, rewritten to claim another id: the proofs and the signature cover the ids.
            hellos = [decode(bytearray(raw)) for raw in recorded]
            for f in hellos:
                f.meta["node_id"] = "someone-else"
            reply, after, other, closed = await _replay(target, [bytes(encode_bytes(f)) for f in hellos])
            assert reply is not None and reply.meta["code"] == "unauthenticated"
            assert after is None and other is None and closed
            assert target.server.refused == 2
            assert not trace.exists() or trace.read_text() == ""  # no frame reached a handler
            # The target goes on serving: a real handshake, a PING and its PONG.
            conn = await PeerConnection.open(*_address(target), node_id="peer-a", key=key)
            pong = await conn.request(Frame(MessageType.PING), timeout=10)
            await conn.close()
            assert pong.type == MessageType.PONG and pong.meta["node_id"] == "target"
        finally:
            recorder.close()
            await target.close()

    run(scenario())
    assert _logged(
        caplog, "refusing a peer at 127.0.0.1: the peer could not prove knowledge of the network key"
    )
    assert '"from":"peer-a"' in trace.read_text()


def test_a_missing_key_is_refused_either_way(caplog):
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)

    async def scenario() -> None:
        keyed = _node("keyed", key)
        open_net = _node("open", None)
        await keyed.start()
        await open_net.start()
        keyless = _node("keyless", None, bootstrap=(keyed.address,))
        stranger = _node("stranger", key, bootstrap=(open_net.address,))
        member = _node("member", key, bootstrap=(keyed.address,))
        for n in (keyless, stranger, member):
            await n.start()
        try:
            # A keyless node joining a keyed network, and a keyed node facing an open one: neither joins.
            assert await keyless.join(wait_s=1.0) == 0
            assert await stranger.join(wait_s=1.0) == 0
            assert keyed.membership.get("keyless") is None and keyless.membership.get("keyed") is None
            assert open_net.membership.get("stranger") is None and stranger.membership.get("open") is None
            assert keyed.server.refused >= 1
            # Both go on serving their own network.
            assert await member.join(wait_s=5.0) == 1
            assert keyed.membership.get("member") is not None
        finally:
            for n in (member, stranger, keyless, open_net, keyed):
                await n.close()

    run(scenario())
    assert _logged(caplog, "the client sent no proof of the network key: it runs an open network")
    assert _logged(caplog, "cannot exchange records with")
    assert _logged(caplog, "the server sent no proof of the network key: it runs an open network")


# ------------------------------------------------------------------------------- identity
def _forged(owner: Node, key: bytes, node_id: str, address: str, cert_fp: str) -> dict:
    """A validly signed record (any key holder can sign) for ``node_id``, newer than its own."""
    rec = owner.own_record().model_copy(
        update={"node_id": node_id, "address": address, "cert_fp": cert_fp, "version": 2**62}
    )
    return sign_record(PeerRecord.model_validate(rec.model_dump()), key).model_dump()


def test_a_peer_claiming_another_nodes_id_is_refused_and_a_restarted_peer_rejoins(span, caplog):
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)
    x = torch.randn(3, HIDDEN)
    want = span(0, 2).forward([SequenceInput("origin.s", x, torch.arange(3))])[0]

    async def scenario() -> float:
        origin = _node("origin", key, end_model=True)
        await origin.start()
        peer = _node("peer-p", key, bootstrap=(origin.address,))
        await peer.start()
        _serve(peer, span(0, 2), (0, 2))
        impostor = _node("peer-p", key, bootstrap=(origin.address,))
        await impostor.start()
        restarted = None
        try:
            assert await peer.join(wait_s=5.0) == 1
            bound = origin.membership.get("peer-p")
            assert bound is not None and bound.address == peer.address
            route = [Hop("peer-p", peer.address, 0, 2)]
            torch.testing.assert_close(await origin.run_step(route, ["s"], [3], _step(x)), want)

            # The server's own id.
            with pytest.raises(AuthError, match="own id"):
                await PeerConnection.open(*_address(origin), node_id="origin", key=key)
            # A live peer's id, from another address (with its own certificate): the origin asks the
            # live peer's address, which still presents the first certificate.
            assert await impostor.join(wait_s=1.0) == 0
            with pytest.raises(AuthError, match="refused this node"):
                await PeerConnection.open(*_address(origin), node_id="peer-p", key=key)
            # The same claim from the server side: the origin connects to the impostor's address
            # (frames could come back over that connection with the server's id) and refuses it.
            with pytest.raises(AuthError, match="claims the id 'peer-p' of the live peer"):
                await origin._link(impostor.address)
            assert impostor.address not in origin._links
            # Forged gossip from a key holder: the live peer's id at the impostor's address, then at
            # its own address with the impostor's certificate (probed, and found false).
            mallory = await PeerConnection.open(*_address(origin), node_id="mallory", key=key)
            fp = impostor.server.cert.fingerprint.hex()
            for address in (impostor.address, peer.address):
                records = [_forged(peer, key, "peer-p", address, fp)]
                await mallory.request(Frame(MessageType.GOSSIP, {"records": records}), timeout=10)
            await mallory.close()
            await asyncio.sleep(0.5)  # the probe of the forged record's address
            bound = origin.membership.get("peer-p")
            assert (bound.address, bound.cert_fp) == (peer.address, peer.server.cert.fingerprint.hex())
            assert origin.membership.conflicts >= 2
            assert plan_route(0, 2, origin.membership.routable(HASH))[0].address == peer.address
            # The origin still routes to the real peer.
            torch.testing.assert_close(await origin.run_step(route, ["s2"], [3], _step(x)), want)

            # A legitimate restart: a new process (a new certificate) at the same address rejoins at once.
            await peer.close()
            restarted = _node("peer-p", key, bootstrap=(origin.address,), listen=peer.address)
            t0 = time.monotonic()
            await restarted.start()
            _serve(restarted, span(0, 2), (0, 2))
            assert await restarted.join(wait_s=10.0) == 1
            rejoined = time.monotonic() - t0
            bound = origin.membership.get("peer-p")
            assert bound.cert_fp == restarted.server.cert.fingerprint.hex()
            torch.testing.assert_close(await origin.run_step(route, ["s3"], [3], _step(x)), want)
            return rejoined
        finally:
            for n in (restarted, impostor, peer, origin):
                if n is not None:
                    await n.close()

    rejoined = run(scenario())
    assert rejoined < 3.0, rejoined
    assert _logged(caplog, "the peer claims this node's own id 'origin'")
    assert _logged(caplog, "the peer claims the id 'peer-p' of the live peer at", logging.DEBUG)
    assert _logged(caplog, "ignoring a record of live peer peer-p")
    assert any("peer peer-p rejoined at" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ session ownership
class _Slow:
    """A span executor that takes ``delay_s`` longer for steps of more than 16 tokens (run on the
    compute thread), so that a step stays outstanding at its origin for a while."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def forward(self, inputs):
        if sum(x.hidden.shape[0] for x in inputs) > 16:
            time.sleep(self.delay_s)
        return self.inner.forward(inputs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_frames_for_sessions_the_sender_does_not_own_are_forbidden(span, caplog):
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)
    gen = torch.Generator().manual_seed(0)
    prompt, token, long = (torch.randn(n, HIDDEN, generator=gen) for n in (4, 1, 20))
    alone = span(0, 2)
    want_prompt = alone.forward([SequenceInput("s", prompt, torch.arange(4))])[0]
    want_token = alone.forward([SequenceInput("s", token, torch.tensor([4]))])[0]
    want_long = alone.forward([SequenceInput("t", long, torch.arange(20))])[0]

    async def scenario() -> None:
        origin = _node("origin", key, end_model=True)
        first = _node("first", key)
        last = _node("last", key)
        for n in (origin, first, last):
            await n.start()
        _serve(first, span(0, 1), (0, 1))
        _serve(last, _Slow(span(1, 2), 1.0), (1, 2))
        route = [Hop("first", first.address, 0, 1), Hop("last", last.address, 1, 2)]
        wire_route = [h.to_json() for h in route]
        mallory = await PeerConnection.open(*_address(origin), node_id="mallory", key=key)
        to_first = await PeerConnection.open(*_address(first), node_id="mallory", key=key)
        to_last = await PeerConnection.open(*_address(last), node_id="mallory", key=key)
        try:
            got = await origin.run_step(route, ["s"], [4], _step(prompt))
            torch.testing.assert_close(got, want_prompt)

            async def forbidden(conn: PeerConnection, frame: Frame) -> str:
                with pytest.raises(PeerErrorReply) as err:
                    await conn.request(frame, timeout=10)
                assert err.value.code == "forbidden", err.value
                return str(err.value)

            # END_SESSION of the origin's session, from someone else: the session keeps its KV.
            end = Frame(MessageType.END_SESSION, {"origin": "origin", "sessions": ["s"]})
            assert "only a session's origin ends it" in await forbidden(to_first, end)
            assert "origin.s" in first.executor.cache.sessions
            # FORWARD in the origin's name to the first hop, and to the second hop as if from the first.
            meta = {
                "step": 99,
                "origin": "origin",
                "reply_to": origin.address,
                "sessions": ["s"],
                "lens": [1],
            }
            fwd = Frame(MessageType.FORWARD, {**meta, "route": wire_route, "hop": 0}, _step(token, 4))
            assert "from its origin 'origin' only" in await forbidden(to_first, fwd)
            fwd.meta["hop"] = 1
            assert "it must come from hop 'first' only" in await forbidden(to_last, fwd)

            # At the origin, with a step outstanding: a RESULT and an ERROR from a stranger, and a
            # RESULT from a hop that is not the route's last.
            pending = asyncio.ensure_future(origin.run_step(route, ["t"], [20], _step(long)))
            while not origin._pending:
                await asyncio.sleep(0.01)
            (step,) = origin._pending
            result = Frame(
                MessageType.RESULT,
                {"step": step, "sessions": ["t"], "lens": [20]},
                {"hidden": torch.zeros(20, HIDDEN)},
            )
            assert "only the last hop of its route, 'last'" in await forbidden(mallory, result)
            error = Frame(MessageType.ERROR, {"code": "PeerStepError", "message": "no", "step": step})
            assert "not a hop of its route" in await forbidden(mallory, error)
            with pytest.raises(PeerErrorReply, match="forbidden"):
                await first.request(origin.address, result, timeout=10)
            assert not pending.done() and not origin.membership.is_marked("first")
            torch.testing.assert_close(await pending, want_long)  # the real result still counts

            # Every attacked node goes on serving: the session continues on its intact KV.
            got = await origin.run_step(route, ["s"], [1], _step(token, 4))
            torch.testing.assert_close(got, want_token)
        finally:
            for conn in (mallory, to_first, to_last):
                await conn.close()
            for n in (last, first, origin):
                await n.close()

    run(scenario())
    for text in (
        "refusing a END_SESSION frame from mallory",
        "refusing a FORWARD frame from mallory",
        "refusing a RESULT frame from mallory",
        "refusing a ERROR frame from mallory",
        "refusing a RESULT frame from first",
    ):
        assert _logged(caplog, text), text


# ---------------------------------------------------------------------------------- limits
def test_max_sessions_refuses_one_more_and_the_origin_reports_it(span, caplog):
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)
    x = torch.randn(2, HIDDEN)

    async def scenario() -> None:
        origin = _node("origin", key, end_model=True)
        peer = _node("peer", key, max_sessions=2)
        for n in (origin, peer):
            await n.start()
        _serve(peer, span(0, 2), (0, 2))
        route = [Hop("peer", peer.address, 0, 2)]
        try:
            await origin.run_step(route, ["a"], [2], _step(x))
            await origin.run_step(route, ["b"], [2], _step(x))
            with pytest.raises(
                RouteFailedError, match=r"SessionLimitError.*over its max_sessions = 2"
            ) as err:
                await origin.run_step(route, ["c"], [2], _step(x))
            assert err.value.node_id == "peer"  # the origin fails it over (another route may have room)
            assert err.value.capacity and not origin.membership.is_marked("peer")  # full, not failed
            assert sorted(peer.executor.cache.sessions) == ["origin.a", "origin.b"]
            # Sessions it holds go on; once one ends, a new one fits.
            await origin.run_step(route, ["a"], [1], _step(x[:1], 2))
            await origin.end_sessions(route, ["b"])
            await asyncio.sleep(0.2)
            await origin.run_step(route, ["c"], [2], _step(x))
            assert sorted(peer.executor.cache.sessions) == ["origin.a", "origin.c"]
        finally:
            for n in (peer, origin):
                await n.close()

    run(scenario())
    assert _logged(caplog, "over its max_sessions = 2", logging.INFO)  # the peer's line
    # A full peer is healthy: it stays routable (marking it would take it off every route).
    assert not _logged(caplog, "peer peer marked as failed")


def test_an_oversize_frame_is_refused_from_its_header(span, caplog):
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)
    limit = 1 << 20

    async def scenario() -> None:
        origin = _node("origin", key, end_model=True)
        peer = _node("peer", key, limits=WireLimits(max_frame_bytes=limit))
        for n in (origin, peer):
            await n.start()
        _serve(peer, span(0, 2), (0, 2))
        route = [Hop("peer", peer.address, 0, 2)]
        try:
            # A header announcing 2 MiB, and nothing after it: the refusal comes before any body byte
            # was sent, so the receiver allocated nothing for it.
            conn = await PeerConnection.open(*_address(peer), node_id="sender", key=key)
            header = bytearray(encode_bytes(Frame(MessageType.PING))[:HEADER_BYTES])
            struct.pack_into("<Q", header, 24, 2 * limit)
            stream = await conn.open_stream()
            stream.writer.write(bytes(header))
            reply = await read_frame(stream.reader, timeout=10)
            assert reply is not None and reply.meta["code"] == "bad_frame"
            assert f"exceeds the limit of {limit} bytes" in reply.meta["message"]
            stream.close()
            await conn.close()
            # A step bigger than the peer takes: the origin hears of it at once, not at step_timeout_s.
            big = torch.randn(5000, HIDDEN)  # 1.28 MB of hidden states
            t0 = time.monotonic()
            with pytest.raises(RouteFailedError, match=f"refused the step's frame.*limit of {limit}"):
                await origin.run_step(route, ["big"], [5000], _step(big))
            assert time.monotonic() - t0 < 5.0
            # And the next step that fits goes through.
            out = await origin.run_step(route, ["ok"], [3], _step(big[:3]))
            assert out.shape == (3, HIDDEN)
        finally:
            for n in (peer, origin):
                await n.close()

    run(scenario())
    assert _logged(caplog, "bad frame from sender: frame: length 2097152 exceeds the limit", logging.INFO)
    refused = _logged(caplog, "refused a frame: frame: length")  # at the origin
    assert refused and all(f"exceeds the limit of {limit} bytes" in line for line in refused)


def test_idle_sessions_are_freed_after_session_timeout(span, caplog):
    caplog.set_level(logging.DEBUG, logger="lpipes")
    key = secrets.token_bytes(32)

    async def scenario() -> float:
        origin = _node("origin", key, end_model=True)
        peer = _node("peer", key, session_timeout_s=1.0)
        for n in (origin, peer):
            await n.start()
        _serve(peer, span(0, 2), (0, 2))
        route = [Hop("peer", peer.address, 0, 2)]
        try:
            await origin.run_step(route, ["idle"], [3], _step(torch.randn(3, HIDDEN)))
            assert peer.executor.cache.sessions == ["origin.idle"] and peer.kv_blocks()[0] > 0
            t0 = time.monotonic()
            while peer.executor.cache.sessions and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.1)
            freed = time.monotonic() - t0
            assert peer.kv_blocks()[0] == 0 and not peer._sessions
            # It goes on serving new sessions.
            await origin.run_step(route, ["next"], [3], _step(torch.randn(3, HIDDEN)))
            return freed
        finally:
            for n in (peer, origin):
                await n.close()

    freed = run(scenario())
    assert 0.5 < freed < 3.5, freed
    assert any("ending 1 idle session(s)" in r.getMessage() for r in caplog.records)

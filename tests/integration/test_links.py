"""One QUIC connection per pair of nodes: a node sends to a peer over the connection that peer opened
to it (streams opened by the server side), and two nodes that connect to each other at the same
moment settle on one of the two connections. Real nodes on 127.0.0.1, real QUIC."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time

from netharness import free_port, in_process_node

from lpipes.node import RETIRE_GRACE_S, Node

SETTLE_S = RETIRE_GRACE_S + 10.0


def _node(node_id: str, key: bytes, bootstrap: list[str], **settings: str) -> Node:
    return in_process_node(node_id, key, bootstrap=bootstrap, num_layers=2, gossip_interval_s=0.2, **settings)


def test_each_pair_of_nodes_shares_one_connection():
    async def scenario() -> None:
        key = secrets.token_bytes(32)
        a = _node("a", key, [])
        await a.start()
        b = _node("b", key, [a.address])
        c = _node("c", key, [a.address])
        nodes = [a, b, c]
        try:
            await b.start()
            await c.start()
            # b and c connect to each other at the same moment, before either has the other's
            # record (so neither can know that the other's connection is coming): two connections.
            results = await asyncio.gather(b._exchange(c.address), c._exchange(b.address))
            assert results == [True, True]
            assert await b.join() >= 1 and await c.join() >= 1
            for n in nodes:
                await n.announce()
            assert {r.node_id for r in b.membership.peers()} == {"a", "c"}
            assert {r.node_id for r in c.membership.peers()} == {"a", "b"}
            # Every pair settles on one connection. b and c connected both ways: the one opened by the
            # smaller id (b) is kept and c's closes after RETIRE_GRACE_S. a may hold two to c for a
            # while too: it heard of c from b (second-hand), and its gossip loop can reach c before
            # c joins through a; then the connection c opened to a is the one that closes.
            deadline = time.monotonic() + SETTLE_S
            while [n.connections() for n in nodes] != [2, 2, 2] and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert [n.connections() for n in nodes] == [2, 2, 2]
            for x in nodes:
                for y in nodes:
                    if x is not y:
                        assert await x._exchange(y.address), (x.s.node_id, y.s.node_id)
            assert [n.connections() for n in nodes] == [2, 2, 2]
        finally:
            for n in nodes:
                await n.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_node_listening_on_every_interface_is_reached_at_its_advertised_address():
    """``listen = "0.0.0.0:PORT"`` with ``advertise``: the record and the replies carry the advertised
    address, and peers reach the node there."""
    port = free_port(socket.SOCK_DGRAM)

    async def scenario() -> None:
        key = secrets.token_bytes(32)
        a = _node("a", key, [], listen=f"0.0.0.0:{port}", advertise=f"127.0.0.1:{port}")
        b = _node("b", key, [f"127.0.0.1:{port}"])
        try:
            assert await a.start() == f"127.0.0.1:{port}"
            await b.start()
            assert await b.join() == 1
            await a.announce()
            (rec,) = b.membership.peers()
            assert (rec.node_id, rec.address) == ("a", f"127.0.0.1:{port}")
            assert [r.address for r in a.membership.peers()] == [b.address]
            assert await a._exchange(b.address) and await b._exchange(a.address)
            assert a.connections() == b.connections() == 1
        finally:
            await b.close()
            await a.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_probe_does_not_take_the_place_of_the_pairs_connection():
    """A node probing a peer's address (``_whois``, when a record rebinds a live id) connects under a
    throwaway id: the peer keeps the pair's connection and its link over it."""

    async def scenario() -> None:
        key = secrets.token_bytes(32)
        a = _node("a", key, [])
        await a.start()
        b = _node("b", key, [a.address])
        try:
            await b.start()
            assert await b.join() == 1 and await a._exchange(b.address)  # b's connection, both ways
            links = (a._links[b.address], b._links[a.address])
            assert (a.connections(), b.connections()) == (1, 1)
            # a has the smaller id: a connection from it is one b would move its link to.
            assert await a._whois(b.address, ("b", b"x")) == ("b", b.server.cert.fingerprint)
            await asyncio.sleep(RETIRE_GRACE_S + 1.0)
            assert (a._links.get(b.address), b._links.get(a.address)) == links
            assert not any(link.conn.closed for link in links)
            assert await a._exchange(b.address) and await b._exchange(a.address)
            assert (a.connections(), b.connections()) == (1, 1)
        finally:
            await b.close()
            await a.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))

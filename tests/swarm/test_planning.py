"""Peer records, membership, layer assignment and routing (pure logic, no network)."""

from __future__ import annotations

import time

import pytest

from lpipes.errors import NoRouteError
from lpipes.swarm import (
    Membership,
    PeerRecord,
    RecordError,
    choose_span,
    coverage,
    plan_route,
    rival_claim,
    sign_record,
)
from lpipes.swarm.records import parse_record

KEY = b"k" * 32


def rec(node_id: str, start: int, end: int, *, ms: float = 0.0, version: int = 1, **kw) -> PeerRecord:
    return PeerRecord(
        node_id=node_id,
        address=kw.pop("address", "127.0.0.1:5000"),
        cert_fp=kw.pop("cert_fp", "aa" * 32),
        model="m",
        model_hash="ab" * 16,
        num_layers=kw.pop("num_layers", 6),
        start=start,
        end=end,
        dtype="float16",
        ms_per_layer=ms,
        version=version,
        **kw,
    )


def test_coverage_and_auto_spans_tile_the_model():
    assert coverage(6, [(0, 2), (1, 4)]) == [1, 2, 1, 1, 0, 0]
    # No origin known: layer peers tile the model from layer 0.
    spans: list[tuple[int, int]] = []
    for _ in range(3):
        spans.append(choose_span(6, 2, spans))
    assert spans == [(0, 2), (2, 4), (4, 6)]
    assert choose_span(6, 10, []) == (0, 6)
    assert choose_span(6, 3, [(0, 6)], first=True) == (0, 3)
    with pytest.raises(ValueError):
        choose_span(6, 0, [])


def test_layer_peers_start_where_routes_can_reach():
    # An origin holding [0, 2): peers start at 2, then where other peers end.
    assert choose_span(6, 2, [], origin_ends=[2]) == (2, 4)
    assert choose_span(6, 2, [(2, 4)], origin_ends=[2]) == (4, 6)
    # A big peer does not take layers the origin runs itself.
    assert choose_span(6, 6, [], origin_ends=[2]) == (2, 6)
    # A fully covered network: the next peer doubles a reachable span.
    assert choose_span(6, 2, [(2, 4), (4, 6)], origin_ends=[2]) == (2, 4)
    # Uncovered layers outweigh doubled ones: start at the boundary 4.
    assert choose_span(6, 3, [(2, 4)], origin_ends=[2]) == (4, 6)
    # An origin holding everything: nothing is needed, the peer doubles the last layers.
    assert choose_span(6, 2, [], origin_ends=[6]) == (4, 6)


def test_simultaneous_auto_claims_go_to_the_lowest_node_id():
    loading = dict(ready=False)
    # p1 and p2 started together and both took [2, 4): p1 keeps it, p2 chooses again with it counted.
    assert rival_claim("p2", (2, 4), [rec("p1", 2, 4, **loading)]).node_id == "p1"
    assert rival_claim("p1", (2, 4), [rec("p2", 2, 4, **loading)]) is None
    assert choose_span(6, 2, [(2, 4)], origin_ends=[2]) == (4, 6)
    # The lowest of several rivals; a claim of another start is no rival.
    many = [rec("p3", 2, 4, **loading), rec("p1", 2, 5, **loading), rec("p0", 4, 6, **loading)]
    assert rival_claim("p4", (2, 4), many).node_id == "p1"
    # A ready peer (chosen knowingly) and an origin's own span are never rivals.
    assert rival_claim("p2", (2, 4), [rec("p1", 2, 4)]) is None
    assert rival_claim("p2", (0, 2), [rec("a", 0, 2, end_model=True, **loading)]) is None


def test_route_is_cheapest_chain_and_deterministic():
    peers = [
        rec("a", 0, 3, ms=1.0),
        rec("b", 3, 6, ms=1.0),
        rec("c", 0, 6, ms=2.0),  # one hop but slower: 12 ms vs 6 ms + one more link
        rec("d", 3, 6, ms=1.0),  # ties with b: lower node id wins
    ]
    route = plan_route(0, 6, peers)
    assert [(h.node_id, h.start, h.end) for h in route] == [("a", 0, 3), ("b", 3, 6)]
    # Slow links make the single hop cheaper.
    route = plan_route(0, 6, peers, link_ms=lambda n: 100.0 if n != "c" else 0.1)
    assert [h.node_id for h in route] == ["c"]
    assert plan_route(2, 2, peers) == []


def test_no_route_names_the_gap():
    with pytest.raises(NoRouteError, match="layer 3"):
        plan_route(0, 6, [rec("a", 0, 3), rec("b", 4, 6)])


def test_records_are_validated_and_signed():
    r = sign_record(rec("a", 0, 3), KEY)
    assert parse_record(r.model_dump(), KEY) == r
    forged = {**r.model_dump(), "end": 6}
    with pytest.raises(RecordError, match="not signed"):
        parse_record(forged, KEY)
    with pytest.raises(RecordError, match="malformed"):
        parse_record({**r.model_dump(), "start": 5, "end": 2}, KEY)
    with pytest.raises(RecordError, match="malformed"):
        parse_record({**r.model_dump(), "extra": 1}, None)
    with pytest.raises(RecordError):
        parse_record([1, 2], None)


def test_membership_keeps_newest_expires_and_marks():
    m = Membership("me", KEY, peer_timeout_s=5.0, mark_s=0.0)
    a1 = sign_record(rec("a", 0, 3, version=1), KEY).model_dump()
    a2 = sign_record(rec("a", 0, 6, version=2), KEY).model_dump()
    me = sign_record(rec("me", 0, 3), KEY).model_dump()
    bad = {**a2, "version": 9}  # signature no longer matches
    assert m.merge([a2, a1, me, bad]) == 1
    assert m.get("a").span == (0, 6)
    assert [r.node_id for r in m.routable("ab" * 16)] == ["a"]
    m.mark("a", "test")
    assert m.is_marked("a") and m.routable("ab" * 16) == []
    now = time.monotonic()
    assert m.expire(now=now + 4) == [] and m.expire(now=now + 6) == ["a"]
    assert m.peers() == []


def test_expired_records_are_not_brought_back_by_stale_gossip():
    m = Membership("me", None, peer_timeout_s=5.0)
    old = rec("a", 0, 3, version=4).model_dump()
    m.merge([old])
    assert m.expire(now=time.monotonic() + 6) == ["a"]
    assert m.merge([old]) == 0 and m.get("a") is None
    assert m.merge([rec("a", 0, 3, version=5).model_dump()]) == 1  # alive again


def test_a_live_nodes_id_stays_bound_to_its_address_and_certificate():
    m = Membership("me", KEY, peer_timeout_s=5.0)
    fp_a, fp_b = "aa" * 32, "bb" * 32

    def signed(version: int, cert_fp: str, address: str = "127.0.0.1:5000") -> dict:
        record = rec("a", 0, 3, version=version, cert_fp=cert_fp, address=address)
        return sign_record(record, KEY).model_dump()

    t0 = time.monotonic()
    assert m.merge([signed(1, fp_a)], now=t0) == 1
    # Any key holder can sign: a newer record naming another address (even "first-hand"), or another
    # certificate at the node's own address, does not replace the live binding.
    elsewhere = signed(2, fp_b, "10.0.0.9:5000")
    assert m.merge([elsewhere], now=t0) == 0
    assert m.merge([elsewhere], verified=("a", fp_b), now=t0) == 0
    restarted = signed(3, fp_b)
    assert m.merge([restarted], now=t0) == 0
    assert m.get("a").cert_fp == fp_a and m.conflicts == 3
    # The same-address claim is handed out once, to be confirmed by probing that address.
    assert [r.cert_fp for r in m.take_unverified()] == [fp_b] and m.take_unverified() == []
    # First-hand (the connection authenticated "a" with that certificate) at the same address: a restart.
    assert m.merge([restarted], verified=("a", fp_b), now=t0) == 1 and m.get("a").cert_fp == fp_b
    # Once the binding is stale (not refreshed for peer_timeout_s), any newer record takes the id.
    moved = signed(4, fp_a, "10.0.0.9:5000")
    assert m.merge([moved], now=t0 + 1) == 0
    assert m.merge([moved], now=t0 + 6) == 1 and m.get("a").address == "10.0.0.9:5000"
    assert m.binding("a", now=t0 + 7) is not None and m.binding("a", now=t0 + 12) is None

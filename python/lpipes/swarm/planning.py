"""Layer assignment and routing over peer records (pure functions).

Assignment (``layers = "auto"``): a node that can hold ``n`` layers takes the window of ``n``
consecutive layers that best covers the least-served layers — each layer scores
``1 / (1 + coverage)²``, so one uncovered layer outweighs any number of doubly covered ones —
starting at a *boundary* a route can reach (where an origin's own span ends, or where another
layer peer's span ends) so that the spans of a network chain up. Ties go to the lowest start.

Routing: the cheapest chain of whole spans from layer ``start`` to ``end``, where a span costs its
measured compute time (``ms_per_layer`` × its layers; an unmeasured node is assumed as slow as the
slowest measured one) plus one link latency per hop. Dijkstra over layer boundaries; ties go to the
chain with fewer hops, then the lowest node ids, so equal networks route identically.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lpipes.errors import NoRouteError
from lpipes.swarm.records import PeerRecord

DEFAULT_MS_PER_LAYER = 1.0  # assumed compute per layer when no node has measured its own yet
DEFAULT_LINK_MS = 0.5  # assumed one-way latency of a link not measured yet


@dataclass(frozen=True)
class Hop:
    """One step of a route: the node and the layers it runs."""

    node_id: str
    address: str
    start: int
    end: int

    def to_json(self) -> dict[str, object]:
        return {"node_id": self.node_id, "address": self.address, "start": self.start, "end": self.end}


def coverage(num_layers: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """How many spans hold each layer."""
    cov = [0] * num_layers
    for start, end in spans:
        for i in range(max(start, 0), min(end, num_layers)):
            cov[i] += 1
    return cov


def choose_span(
    num_layers: int,
    capacity: int,
    spans: Sequence[tuple[int, int]],
    *,
    first: bool = False,
    origin_ends: Sequence[int] = (),
) -> tuple[int, int]:
    """The span a node that can hold ``capacity`` layers should take (see the module docs).

    Args:
        num_layers: layers of the model.
        capacity: most layers the node can hold (its memory budget); at least 1.
        spans: the spans other layer peers of the model already hold (or are loading).
        first: the span must start at layer 0 (an origin keeping the first span).
        origin_ends: where known origins' own spans end. Routes start there, so a layer peer's span
            must start at one of them or where another layer peer's span ends; without any origin
            known, layer 0 is a start too.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 layer, got {capacity}")
    n = min(capacity, num_layers)
    if first:
        return (0, n)
    cov = coverage(num_layers, [*spans, *((0, e) for e in origin_ends)])
    boundaries = set(origin_ends) | {e for _, e in spans}
    if not origin_ends:
        boundaries.add(0)
    best: tuple[float, int] | None = None
    for s in sorted(b for b in boundaries if b < num_layers):
        e = min(s + n, num_layers)
        score = sum(1.0 / (1 + cov[i]) ** 2 for i in range(s, e))
        if best is None or score > best[0] + 1e-12:
            best = (score, s)
    if best is None:  # every origin holds the whole model: nothing to add; double the last layers
        return (max(0, num_layers - n), num_layers)
    s = best[1]
    return (s, min(s + n, num_layers))


def rival_claim(node_id: str, span: tuple[int, int], peers: Sequence[PeerRecord]) -> PeerRecord | None:
    """The peer that keeps ``span``'s window when it and this node (``node_id``) claimed the same start
    while both were still loading: ``auto`` nodes that start together choose from the same view of
    the network and so take the same window; the lowest node id keeps it and the others choose
    again with its claim counted. A ready peer is never a rival (a node that saw it chose a
    doubled span knowingly), nor an origin (origins keep their own first span)."""
    rivals = [
        p for p in peers if not p.ready and not p.end_model and p.start == span[0] and p.node_id < node_id
    ]
    return min(rivals, key=lambda p: p.node_id) if rivals else None


def plan_route(
    start: int,
    end: int,
    peers: Sequence[PeerRecord],
    *,
    link_ms: Callable[[str], float | None] = lambda _node: None,
) -> list[Hop]:
    """The cheapest chain of ``peers``' spans covering layers ``[start, end)`` (see the module docs).

    Args:
        link_ms: measured one-way latency to a node in ms, or None if unknown.

    Raises:
        NoRouteError: no chain covers the range; the message names the first layer nobody serves.
    """
    if start >= end:
        return []
    measured = [p.ms_per_layer for p in peers if p.ms_per_layer > 0]
    slow = max(measured) if measured else DEFAULT_MS_PER_LAYER
    by_start: dict[int, list[PeerRecord]] = {}
    for p in peers:
        if start <= p.start < p.end <= end:
            by_start.setdefault(p.start, []).append(p)
    # (cost, hops, node ids so far, boundary)
    heap: list[tuple[float, int, tuple[str, ...], int]] = [(0.0, 0, (), start)]
    best: dict[int, tuple[float, int, tuple[str, ...]]] = {start: (0.0, 0, ())}
    prev: dict[int, tuple[int, PeerRecord]] = {}
    while heap:
        cost, hops, ids, at = heapq.heappop(heap)
        if best.get(at, (float("inf"),))[:3] < (cost, hops, ids):
            continue
        if at == end:
            break
        for p in by_start.get(at, ()):
            link = link_ms(p.node_id)
            c = (
                cost
                + (p.ms_per_layer or slow) * (p.end - p.start)
                + (DEFAULT_LINK_MS if link is None else link)
            )
            key = (c, hops + 1, (*ids, p.node_id))
            if key < best.get(p.end, (float("inf"), 0, ())):
                best[p.end] = key
                prev[p.end] = (at, p)
                heapq.heappush(heap, (*key, p.end))
    if end not in best:
        reach = {start} | set(best)
        furthest = max(reach)
        raise NoRouteError(
            f"no live peer chain covers layers [{start}, {end}): nothing reachable serves layer {furthest} "
            f"({len(peers)} usable peer(s)); start a peer with those layers or wait for one to join"
        )
    route: list[Hop] = []
    at = end
    while at != start:
        frm, p = prev[at]
        route.append(Hop(p.node_id, p.address, p.start, p.end))
        at = frm
    return route[::-1]

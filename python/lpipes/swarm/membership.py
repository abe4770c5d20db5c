"""The table of peer records a node has learnt, with expiry and failure marks.

Records arrive by gossip (and from the peers themselves); the newest version of each node's record
is kept with the local time it was last refreshed. A node that stops issuing new versions drops
out after ``peer_timeout_s``. The origin *marks* a peer that failed a step: a marked peer is not
routed to until it issues a record newer than the failure (it restarted, or recovered) and the
mark has aged ``mark_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from lpipes.swarm.records import PeerRecord, RecordError, parse_record

log = logging.getLogger(__name__)

MAX_RECORDS = 4096  # most peers one node keeps; gossip beyond this is dropped


class Membership:
    """Records of the other nodes (thread-safe: the engine thread reads it to route).

    Args:
        node_id: this node's id (records claiming it are ignored).
        key: the network key that signs records, or None for an open network.
        peer_timeout_s: a node whose record was not refreshed for this long is dropped.
        mark_s: how long a marked (failed) peer stays out of routes at least.
    """

    def __init__(
        self, node_id: str, key: bytes | None, *, peer_timeout_s: float = 10.0, mark_s: float = 30.0
    ) -> None:
        self.node_id = node_id
        self.key = key
        self.peer_timeout_s = peer_timeout_s
        self.mark_s = mark_s
        self._lock = threading.Lock()
        self._records: dict[str, tuple[PeerRecord, float]] = {}  # node id -> (record, refreshed at)
        self._marks: dict[str, tuple[float, int]] = {}  # node id -> (marked at, version then)
        # Expired nodes' last versions: gossip from peers that have not expired them yet must not
        # bring them back; only a newer record (the node is alive again) does.
        self._gone: dict[str, int] = {}

    def merge(self, records: Iterable[Any], *, now: float | None = None) -> int:
        """Take in records from the network (invalid ones are logged and skipped); returns how many
        were new or newer than what was known."""
        now = time.monotonic() if now is None else now
        changed = 0
        for data in records:
            try:
                rec = parse_record(data, self.key)
            except RecordError as exc:
                log.info("ignoring a peer record: %s", exc)
                continue
            if rec.node_id == self.node_id:
                continue
            with self._lock:
                old = self._records.get(rec.node_id)
                if old is not None and old[0].version >= rec.version:
                    continue
                if rec.version <= self._gone.get(rec.node_id, -1):
                    continue
                self._gone.pop(rec.node_id, None)
                if old is None and len(self._records) >= MAX_RECORDS:
                    continue
                if old is None:
                    log.info("peer %s joined: %s layers [%d, %d)", rec.node_id, rec.address, *rec.span)
                self._records[rec.node_id] = (rec, now)
                changed += 1
        return changed

    def expire(self, *, now: float | None = None) -> list[str]:
        """Drop nodes whose records went stale; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [nid for nid, (_, t) in self._records.items() if now - t > self.peer_timeout_s]
            for nid in gone:
                self._gone[nid] = self._records.pop(nid)[0].version
            while len(self._gone) > MAX_RECORDS:
                del self._gone[next(iter(self._gone))]
        for nid in gone:
            log.warning("peer %s stopped answering; dropped from the network", nid)
        return gone

    def peers(self, *, now: float | None = None) -> list[PeerRecord]:
        """Records of live nodes (not expired), sorted by node id."""
        now = time.monotonic() if now is None else now
        with self._lock:
            live = [r for r, t in self._records.values() if now - t <= self.peer_timeout_s]
        return sorted(live, key=lambda r: r.node_id)

    def get(self, node_id: str) -> PeerRecord | None:
        with self._lock:
            entry = self._records.get(node_id)
        return None if entry is None else entry[0]

    def last_seen(self, node_id: str) -> float | None:
        """Seconds since this node's record was last refreshed (None if unknown)."""
        with self._lock:
            entry = self._records.get(node_id)
        return None if entry is None else time.monotonic() - entry[1]

    def mark(self, node_id: str, reason: str) -> None:
        """Keep a peer out of routes (it failed a step)."""
        rec = self.get(node_id)
        with self._lock:
            self._marks[node_id] = (time.monotonic(), rec.version if rec else -1)
        log.warning("peer %s marked as failed: %s", node_id, reason)

    def is_marked(self, node_id: str, *, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            m = self._marks.get(node_id)
            if m is None:
                return False
            entry = self._records.get(node_id)
            recovered = entry is not None and entry[0].version > m[1] and entry[1] > m[0]
            if recovered and now - m[0] > self.mark_s:
                del self._marks[node_id]
                return False
            return True

    def routable(self, model_hash: str) -> list[PeerRecord]:
        """Live, ready, unmarked nodes of a model that run at least one layer."""
        now = time.monotonic()
        return [
            r
            for r in self.peers(now=now)
            if r.model_hash == model_hash and r.ready and r.end > r.start and not self.is_marked(r.node_id)
        ]

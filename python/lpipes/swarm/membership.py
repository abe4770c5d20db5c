"""The table of peer records a node has learnt, with expiry and failure marks.

Records arrive by gossip (and from the peers themselves); the newest version of each node's record
is kept with the local time it was last refreshed. A node that stops issuing new versions drops
out after ``peer_timeout_s``. The origin *marks* a peer that failed a step: a marked peer is not
routed to until it issues a record newer than the failure (it restarted, or recovered) and the
mark has aged ``mark_s``.

A live node's id is bound to its address and certificate (``cert_fp``): a newer record that names
another address or certificate for it is ignored, so a forged record cannot move a live node's
traffic elsewhere. Two exceptions let a restarted node (new process, new certificate, same address)
back in at once: a record the node itself sent over a connection authenticated with that certificate
(*first-hand*, ``verified``), and a record whose certificate a probe of that address confirmed
(:meth:`take_unverified` lists those to probe). Otherwise a new binding waits until the old record
has expired.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from typing import Any

from lpipes.swarm.records import PeerRecord, RecordError, parse_record

log = logging.getLogger(__name__)

CONFLICT_LOG_INTERVAL_S = 60.0  # a conflicting record is warned of once per node id per this many seconds

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
        # Records that name a live node's address with another certificate (a restart, or a forgery):
        # taken by the node, which probes the address (take_unverified).
        self._unverified: dict[str, PeerRecord] = {}
        self._conflicts_logged: dict[str, float] = {}
        self.conflicts = 0  # records ignored for naming another address or certificate for a live id

    def merge(
        self,
        records: Iterable[Any],
        *,
        verified: tuple[str, str] | None = None,
        now: float | None = None,
    ) -> int:
        """Take in records from the network (invalid ones are logged and skipped); returns how many
        were new or newer than what was known.

        Args:
            verified: (node id, certificate fingerprint in hex) that the connection these records
                came over authenticated: that node's own record among them is first-hand and may
                rebind its id to a new certificate at the same address (see the module docs).
        """
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
            first_hand = verified == (rec.node_id, rec.cert_fp)
            with self._lock:
                old = self._records.get(rec.node_id)
                if old is not None and old[0].version >= rec.version:
                    continue
                if rec.version <= self._gone.get(rec.node_id, -1):
                    continue
                if old is not None and not self._may_replace(old[0], old[1], rec, first_hand, now):
                    continue
                self._gone.pop(rec.node_id, None)
                self._unverified.pop(rec.node_id, None)
                if old is None and len(self._records) >= MAX_RECORDS:
                    continue
                if old is None:
                    log.info("peer %s joined: %s layers [%d, %d)", rec.node_id, rec.address, *rec.span)
                elif old[0].cert_fp != rec.cert_fp:
                    log.info("peer %s rejoined at %s with a new certificate", rec.node_id, rec.address)
                self._records[rec.node_id] = (rec, now)
                changed += 1
        return changed

    def _may_replace(
        self, old: PeerRecord, refreshed: float, rec: PeerRecord, first_hand: bool, now: float
    ) -> bool:
        """Whether ``rec`` may replace the known ``old`` record of its node (under the lock)."""
        if (old.address, old.cert_fp) == (rec.address, rec.cert_fp):
            return True
        if now - refreshed > self.peer_timeout_s:  # the old binding is stale: any newer record wins
            return True
        if rec.address == old.address:
            if first_hand:
                return True
            self._unverified[rec.node_id] = rec
        self.conflicts += 1
        last = self._conflicts_logged.get(rec.node_id, -math.inf)
        level = logging.WARNING if now - last >= CONFLICT_LOG_INTERVAL_S else logging.DEBUG
        if level == logging.WARNING:
            if len(self._conflicts_logged) > 1024:
                self._conflicts_logged.clear()
            self._conflicts_logged[rec.node_id] = now
        log.log(
            level,
            "ignoring a record of live peer %s: it names %s with certificate %s…, but %s is bound to %s "
            "with certificate %s… until that record expires",
            rec.node_id,
            rec.address,
            rec.cert_fp[:16],
            rec.node_id,
            old.address,
            old.cert_fp[:16],
        )
        return False

    def take_unverified(self) -> list[PeerRecord]:
        """Records that name a live node's own address with another certificate (a restart, or a
        forgery), to be confirmed by probing that address; each is returned once."""
        with self._lock:
            out = list(self._unverified.values())
            self._unverified.clear()
        return out

    def binding(self, node_id: str, *, now: float | None = None) -> PeerRecord | None:
        """The live record a node id is bound to (None: unknown or stale, so a new claimant may take it)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._records.get(node_id)
        if entry is None or now - entry[1] > self.peer_timeout_s:
            return None
        return entry[0]

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

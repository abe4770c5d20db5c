"""Membership, peer records, layer assignment and routing of the peer network.

* :mod:`~lpipes.swarm.records` — the signed :class:`PeerRecord` every node publishes about itself;
* :mod:`~lpipes.swarm.membership` — the table of records learnt by gossip, with expiry;
* :mod:`~lpipes.swarm.planning` — ``layers = "auto"`` span choice, layer coverage and routing
  (the cheapest chain of spans covering a range of layers).
"""

from lpipes.swarm.membership import Membership
from lpipes.swarm.planning import Hop, NoRouteError, choose_span, coverage, plan_route, rival_claim
from lpipes.swarm.records import PeerRecord, RecordError, sign_record

__all__ = [
    "Hop",
    "Membership",
    "NoRouteError",
    "PeerRecord",
    "RecordError",
    "choose_span",
    "coverage",
    "plan_route",
    "rival_claim",
    "sign_record",
]

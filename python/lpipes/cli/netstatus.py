"""`lpipes status --config node.toml`: the peer network as one node sees it.

Connects to the node's QUIC address (``[network].listen``) with the network key, asks for its peer
records (a ``GOSSIP`` exchange that offers none) and shows every peer and how many nodes hold
each layer. ``--json`` prints the same as JSON for scripts.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from lpipes.config import NodeConfig
from lpipes.errors import LpipesError

PEER_FIELDS = ("node_id", "address", "model", "layers", "kv_blocks_used", "kv_blocks_total", "last_seen")


async def _query(host: str, port: int, key: bytes | None, timeout: float) -> dict[str, Any]:
    from lpipes.net.transport import PeerConnection, TransportError
    from lpipes.wire import Frame, MessageType

    try:
        conn = await PeerConnection.open(
            host,
            port,
            node_id="status-" + secrets.token_hex(4),
            key=key,
            handshake_timeout_s=min(timeout, 5.0),
        )
    except TransportError as exc:
        raise LpipesError(f"no node answers on {host}:{port} ({exc}); is `lpipes serve` running?") from None
    try:
        reply = await conn.request(Frame(MessageType.GOSSIP, {"records": []}), timeout=timeout)
    finally:
        await conn.close()
    return reply.meta


def query_network(cfg: NodeConfig, timeout: float = 10.0) -> dict[str, Any]:
    """The network as the node of ``cfg`` sees it (see :func:`network_summary`)."""
    from lpipes.config import listens_everywhere
    from lpipes.net.auth import load_key
    from lpipes.swarm.records import parse_record

    key = load_key(cfg.network.key_file) if cfg.network.key_file is not None else None
    host, _, port = cfg.network.listen.rpartition(":")
    if listens_everywhere(cfg.network.listen):  # the node runs here: ask it on loopback
        host = "127.0.0.1"
    meta = asyncio.run(_query(host.strip("[]"), int(port), key, timeout))
    raw = meta.get("records")
    if not isinstance(raw, list) or not raw:
        raise LpipesError(f"{cfg.network.listen} answered without peer records; is it an lpipes node?")
    records = [parse_record(r, key) for r in raw]
    seen = meta.get("last_seen_s") if isinstance(meta.get("last_seen_s"), dict) else {}
    return network_summary(records, seen)


def network_summary(
    records: list[Any], last_seen_s: dict[str, Any], now: float | None = None
) -> dict[str, Any]:
    """JSON-ready view: the answering node (first record), every peer and the per-layer coverage."""
    from lpipes.swarm.planning import coverage

    now = time.time() if now is None else now
    me = records[0]
    peers = []
    for i, r in enumerate(records):
        ago = 0.0 if i == 0 else last_seen_s.get(r.node_id)
        peers.append(
            {
                "node_id": r.node_id,
                "address": r.address,
                "model": r.model,
                "layers": [r.start, r.end],
                "dtype": r.dtype,
                "end_model": r.end_model,
                "ready": r.ready,
                "kv_blocks_used": r.kv_blocks_used,
                "kv_blocks_total": r.kv_blocks_total,
                "ms_per_layer": r.ms_per_layer,
                "last_seen": round(now - float(ago), 3) if isinstance(ago, (int, float)) else None,
            }
        )
    same = [r for r in records if r.model_hash == me.model_hash]
    cov = coverage(me.num_layers, [r.span for r in same if r.ready])
    return {
        "node_id": me.node_id,
        "model": me.model,
        "num_layers": me.num_layers,
        "peers": peers,
        "coverage": cov,
        "uncovered": [i for i, c in enumerate(cov) if c == 0],
    }


def network_table(data: dict[str, Any]) -> Group:
    peers = Table(title=f"peers seen by {data['node_id']} ({data['model']}, {data['num_layers']} layers)")
    for col in ("node", "address", "layers", "role", "KV blocks", "ms/layer", "last seen"):
        peers.add_column(col)
    now = time.time()
    for p in data["peers"]:
        start, end = p["layers"]
        role = "origin" if p["end_model"] else "layers"
        if not p["ready"]:
            role += " (loading)"
        seen = "-" if p["last_seen"] is None else f"{max(0.0, now - p['last_seen']):.1f} s ago"
        peers.add_row(
            p["node_id"],
            p["address"],
            f"[{start}, {end})" if end > start else "none",
            role,
            f"{p['kv_blocks_used']}/{p['kv_blocks_total']}",
            f"{p['ms_per_layer']:.3f}" if p["ms_per_layer"] else "-",
            seen,
        )
    cov = data["coverage"]
    bar = Text("coverage per layer: ")
    for c in cov:
        bar.append(str(min(c, 9)), style="bold red" if c == 0 else "green")
    lines: list[Any] = [peers, bar]
    if data["uncovered"]:
        lines.append(Text(f"layers nobody serves: {data['uncovered']}", style="bold red"))
    else:
        lines.append(Text("every layer is served", style="green"))
    return Group(*lines)

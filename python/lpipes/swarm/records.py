"""Peer records: what a node tells the network about itself.

A record is issued by its node only; ``version`` grows with every issue, so the newest record of a
node wins wherever records meet. With a network key the record carries an HMAC-SHA256 signature by
that key over its canonical JSON (every field but ``signature``, sorted keys), so a record that was
altered on the way, or made up by someone without the key, is dropped. The key authenticates
membership, not identity: any key holder can sign any record. What binds a node id is ``cert_fp``, the
fingerprint of the certificate the node's listener presents and its handshakes are signed with;
:class:`~lpipes.swarm.membership.Membership` keeps a live node's id bound to it
(``docs/threat-model.md``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lpipes.errors import LpipesError
from lpipes.net.auth import NODE_ID_PATTERN

__all__ = ["NODE_ID_PATTERN", "PeerRecord", "RecordError", "parse_record", "sign_record"]


class RecordError(LpipesError, ValueError):
    """A peer record is malformed or its signature does not verify."""


class PeerRecord(BaseModel):
    """One node's self-description (see the module docs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    node_id: Annotated[str, Field(min_length=1, max_length=64, pattern=NODE_ID_PATTERN)]
    address: Annotated[str, Field(min_length=3, max_length=262)]  # HOST:PORT of its QUIC listener
    cert_fp: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # SHA-256 of its certificate (DER), hex
    model: Annotated[str, Field(max_length=256)]  # display name: hub id or directory name
    model_hash: Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")]
    num_layers: Annotated[int, Field(ge=1, le=100_000)]
    start: Annotated[int, Field(ge=0)]  # layers [start, end) this node runs; start == end: none
    end: Annotated[int, Field(ge=0)]
    dtype: Annotated[str, Field(max_length=16)]
    end_model: bool = False  # an origin: tokenizer, embedding, head and the API live here
    ready: bool = True  # False while the node loads its span (counted for coverage, not routed to)
    kv_blocks_used: Annotated[int, Field(ge=0)] = 0
    kv_blocks_total: Annotated[int, Field(ge=0)] = 0
    kv_block_tokens: Annotated[int, Field(ge=1, le=1024)] = 16  # token positions per KV block
    ms_per_layer: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0  # measured decode compute; 0 = unknown
    version: Annotated[int, Field(ge=0)] = 0
    issued_at: Annotated[float, Field(ge=0.0)] = 0.0  # the issuer's Unix time
    signature: Annotated[str, Field(max_length=64)] = ""

    @model_validator(mode="after")
    def _span(self) -> PeerRecord:
        if not self.start <= self.end <= self.num_layers:
            raise ValueError(
                f"span [{self.start}, {self.end}) is not within the model's {self.num_layers} layers"
            )
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address must be HOST:PORT, got {self.address!r}")
        return self

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def payload(self) -> bytes:
        """The canonical bytes the signature covers."""
        return orjson.dumps(self.model_dump(exclude={"signature"}), option=orjson.OPT_SORT_KEYS)


def sign_record(record: PeerRecord, key: bytes | None) -> PeerRecord:
    """The record with its signature set (empty without a key)."""
    sig = "" if key is None else hmac.new(key, record.payload(), hashlib.sha256).hexdigest()
    return record.model_copy(update={"signature": sig})


def parse_record(data: Any, key: bytes | None) -> PeerRecord:
    """Validate a record received from the network and check its signature.

    Raises:
        RecordError: a malformed record or (with a key) a missing or wrong signature.
    """
    if not isinstance(data, dict):
        raise RecordError("a peer record must be a JSON object")
    try:
        record = PeerRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecordError(f"malformed peer record ({where}: {first['msg']})") from None
    if key is not None:
        expected = hmac.new(key, record.payload(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(record.signature.encode(), expected.encode()):
            raise RecordError(f"the record of {record.node_id!r} is not signed with the network key")
    return record

"""The QUIC library, imported in one place (see bench/transport.py for why this one)."""

from __future__ import annotations

import hashlib
from typing import Any

from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

# Flow-control windows sized for prefill frames of tens of MiB; measured in bench/transport.py.
TUNING: dict[str, Any] = {"max_data": 64 << 20, "max_stream_data": 32 << 20}


def peer_fingerprint(protocol: Any) -> bytes:
    """SHA-256 of the DER certificate the peer presented in the TLS handshake."""
    cert = protocol._quic.tls._peer_certificate
    if cert is None:
        raise ConnectionError("the peer presented no certificate")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


__all__ = ["QuicConfiguration", "TUNING", "connect", "peer_fingerprint", "serve"]

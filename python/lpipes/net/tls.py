"""A self-signed certificate per node for QUIC's TLS 1.3.

Peers do not trust certificates through a CA: a node proves membership of the network with the
network key (``lpipes.net.auth``), and that proof covers the server certificate's fingerprint, so a
relay in the middle with its own certificate cannot pass the handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class NodeCertificate:
    cert_file: Path
    key_file: Path
    fingerprint: bytes  # SHA-256 of the DER certificate


def make_certificate(node_id: str, directory: Path | None = None) -> NodeCertificate:
    """A fresh ECDSA P-256 self-signed certificate for this process (valid for a year)."""
    directory = Path(directory or tempfile.mkdtemp(prefix="lpipes-tls-"))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lpipes-{node_id}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "node.crt", directory / "node.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return NodeCertificate(cert_file, key_file, fingerprint_of(cert))


def fingerprint_of(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()

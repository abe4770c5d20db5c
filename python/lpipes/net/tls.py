"""A self-signed certificate per node for QUIC's TLS 1.3, and the node's identity.

Peers do not trust certificates through a CA: a node proves membership of the network with the
network key (``lpipes.net.auth``), and that proof covers the server certificate's fingerprint, so a
relay in the middle with its own certificate cannot pass the handshake. The same certificate is the
node's identity as a client: it signs the handshakes it opens with the certificate's key, so the
node id it claims is bound to the fingerprint its own listener presents (``docs/threat-model.md``).

The certificate and its key live in memory only (qh3 loads them from PEM bytes): nothing to clean
up, no private key left in a temporary folder.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class NodeCertificate:
    cert_pem: bytes
    key_pem: bytes
    der: bytes  # the certificate, DER: what a client sends to prove its identity
    fingerprint: bytes  # SHA-256 of ``der``
    private_key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``node.crt`` and ``node.key`` (mode 0600) to ``directory`` (for tools that read files)."""
        cert_file, key_file = Path(directory) / "node.crt", Path(directory) / "node.key"
        cert_file.write_bytes(self.cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(self.key_pem)
        return cert_file, key_file

    @classmethod
    def load(cls, directory: Path) -> NodeCertificate:
        """Read what :meth:`write` wrote."""
        cert_pem = (Path(directory) / "node.crt").read_bytes()
        key_pem = (Path(directory) / "node.key").read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory}/node.key is not an ECDSA key")
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(cert_pem, key_pem, der, hashlib.sha256(der).digest(), key)


def make_certificate(node_id: str, directory: Path | None = None) -> NodeCertificate:
    """A fresh ECDSA P-256 self-signed certificate for this process (valid for a year); also written
    to ``directory`` when one is given."""
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
    der = cert.public_bytes(serialization.Encoding.DER)
    node_cert = NodeCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        der=der,
        fingerprint=hashlib.sha256(der).digest(),
        private_key=key,
    )
    if directory is not None:
        node_cert.write(Path(directory))
    return node_cert


def fingerprint_of(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()

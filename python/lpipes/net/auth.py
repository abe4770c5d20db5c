"""The network key, node identities, and the mutual, replay-safe handshake every connection starts with.

Four frames open every connection, on its first stream, before any other frame is processed::

    client → HELLO   {node_id: id_c, nonce: nonce_c}
    server → WELCOME {node_id: id_s, nonce: nonce_s, proof: proof_s}
    client → HELLO   {node_id: id_c, nonce: nonce_c, cert: cert_c, sig: sig_c, proof: proof_c}
    server → WELCOME {ok: true}

    t       = nonce_c "|" nonce_s "|" id_c "|" id_s "|" hex(fp_s)
    proof_s = HMAC-SHA256(key, "lpipes-auth-v2|server|" t)
    proof_c = HMAC-SHA256(key, "lpipes-auth-v2|client|" t "|" hex(fp_c))
    sig_c   = ECDSA-P256-SHA256(the client's certificate key, "lpipes-auth-v2|identity|" t "|" hex(fp_c))

``fp_s`` is the SHA-256 fingerprint of the server's TLS certificate as each side sees it, so a relay
with its own certificate fails both proofs; ``cert_c`` is the client's own node certificate (DER) and
``fp_c`` its fingerprint. Fresh 32-byte nonces from both sides make every proof and signature
single-use, and since both node ids are part of ``t``, a recorded or relayed handshake cannot be
replayed, nor changed to claim another id. The HMAC proofs show that both sides hold the network key
(membership); the signature shows that the client holds the private key of ``cert_c``, the
certificate its own listener presents: a node id is then bound to that certificate
(``docs/threat-model.md``), on an open network as well.

A failure raises :class:`AuthError`; the server answers it with an ``ERROR`` frame
(``unauthenticated``) and closes the connection. Without a key the network is open: the same frames
flow with empty proofs, and the log says so.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from lpipes.errors import LpipesError

if TYPE_CHECKING:
    from lpipes.net.tls import NodeCertificate

NONCE_BYTES = 32
MIN_KEY_BYTES = 16
MAX_CERT_BYTES = 4096  # a node certificate (ECDSA P-256, self-signed) is ~400 bytes of DER
NODE_ID_PATTERN = r"^[A-Za-z0-9._-]+$"  # no "|": the transcript's fields cannot run into each other
MAX_NODE_ID = 64
_NODE_ID = re.compile(NODE_ID_PATTERN)
_LABEL = b"lpipes-auth-v2|"


class AuthError(LpipesError):
    """A peer could not prove knowledge of the network key or its identity (or the key file is unusable).

    ``reason`` groups refusals for rate-limited logging: ``"key"`` (a missing or wrong proof),
    ``"identity"`` (a node id this node will not accept from that peer) or ``"handshake"`` (anything
    else: a malformed or incomplete handshake).
    """

    def __init__(self, message: str, reason: str = "handshake") -> None:
        super().__init__(message)
        self.reason = reason


def load_key(path: str | Path) -> bytes:
    """Read a network key file: the secret is its content with surrounding whitespace removed."""
    path = Path(path)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise AuthError(f"cannot read the network key file {path}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(
            f"the network key in {path} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > network.key`)"
        )
    return key


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def check_nonce(value: object) -> str:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise AuthError("handshake: nonce must be 64 hex characters")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise AuthError("handshake: nonce must be 64 hex characters") from None
    return value


def check_node_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NODE_ID or not _NODE_ID.match(value):
        raise AuthError(
            f"handshake: node_id must be 1-{MAX_NODE_ID} of A-Z a-z 0-9 . _ - (got {value!r:.80})"
        )
    return value


def transcript(nonce_c: str, nonce_s: str, id_c: str, id_s: str, fp_s: bytes) -> bytes:
    """What both proofs and the client's signature cover: both nonces, both node ids and the server
    certificate's fingerprint (ids are checked by :func:`check_node_id`, so ``|`` separates)."""
    return "|".join((nonce_c, nonce_s, id_c, id_s, fp_s.hex())).encode()


def proof(key: bytes | None, role: str, t: bytes, fp_c: bytes | None = None) -> str:
    """HMAC-SHA256 of ``role`` over the transcript (and, for the client, its certificate's
    fingerprint); empty for an open network."""
    if key is None:
        return ""
    msg = _LABEL + role.encode() + b"|" + t
    if fp_c is not None:
        msg += b"|" + fp_c.hex().encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def check_proof(key: bytes | None, given: object, role: str, t: bytes, fp_c: bytes | None = None) -> None:
    if key is None:
        return
    if given == "" or given is None:
        side = "server" if role == "server" else "client"
        raise AuthError(
            f"the {side} sent no proof of the network key: it runs an open network (no key_file)", "key"
        )
    expected = proof(key, role, t, fp_c)
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthError("the peer could not prove knowledge of the network key", "key")


def sign_identity(cert: NodeCertificate, t: bytes) -> tuple[str, str]:
    """The client's ``cert`` and ``sig`` fields (hex): its certificate and an ECDSA signature by the
    certificate's key over the transcript, which proves the client holds that key."""
    sig = cert.private_key.sign(_identity_message(t, cert.fingerprint), ec.ECDSA(hashes.SHA256()))
    return cert.der.hex(), sig.hex()


def cert_fingerprint(cert_hex: object) -> bytes:
    """The fingerprint (SHA-256 of the DER) of the certificate a client's second HELLO names; the
    proof is checked with it before the certificate is parsed or its signature verified."""
    if not isinstance(cert_hex, str) or not 0 < len(cert_hex) <= 2 * MAX_CERT_BYTES:
        raise AuthError("handshake: the second HELLO needs the client's certificate", "identity")
    try:
        return hashlib.sha256(bytes.fromhex(cert_hex)).digest()
    except ValueError:
        raise AuthError("handshake: the client's certificate is not hex", "identity") from None


def verify_identity(cert_hex: object, sig_hex: object, t: bytes) -> bytes:
    """Check a client's certificate and its signature over the transcript; returns the certificate's
    fingerprint (SHA-256 of its DER), the identity its node id is bound to."""
    fp = cert_fingerprint(cert_hex)
    if not isinstance(sig_hex, str) or len(sig_hex) > 512:
        raise AuthError("handshake: the second HELLO needs the client's signature", "identity")
    try:
        der, sig = bytes.fromhex(str(cert_hex)), bytes.fromhex(sig_hex)
        public = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        raise AuthError("handshake: the client's certificate is malformed", "identity") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise AuthError("handshake: the client's certificate must hold an ECDSA P-256 key", "identity")
    try:
        public.verify(sig, _identity_message(t, fp), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AuthError("handshake: the client's signature does not verify", "identity") from None
    return fp


def _identity_message(t: bytes, fp_c: bytes) -> bytes:
    return _LABEL + b"identity|" + t + b"|" + fp_c.hex().encode()

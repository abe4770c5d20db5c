"""The network key and the mutual, replay-safe handshake every connection starts with.

With a key, four frames open every connection, on its first stream, before any other frame is
processed::

    client → HELLO   {node_id, nonce_c}
    server → WELCOME {node_id, nonce_s, proof_s}   proof_s = HMAC(key, "server" | nonce_c | nonce_s | fp)
    client → HELLO   {node_id, nonce_c, proof_c}   proof_c = HMAC(key, "client" | nonce_s | nonce_c | fp)
    server → WELCOME {ok: true}

``fp`` is the SHA-256 fingerprint of the server's TLS certificate as each side sees it, so a relay
with its own certificate fails both proofs; fresh 32-byte nonces from both sides make every proof
single-use. A wrong proof gets an ``ERROR`` frame (``unauthenticated``) and the connection is closed.
Without a key the network is open: the same frames flow with empty proofs, and the log says so.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from lpipes.errors import LpipesError

NONCE_BYTES = 32
MIN_KEY_BYTES = 16


class AuthError(LpipesError):
    """A peer could not prove knowledge of the network key (or the key file is unusable)."""


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


def proof(key: bytes | None, role: str, first: str, second: str, fingerprint: bytes) -> str:
    """HMAC-SHA256 over the role, both nonces (in the order given) and the server certificate's
    fingerprint; empty for an open network."""
    if key is None:
        return ""
    msg = (
        b"lpipes-auth-v1|"
        + role.encode()
        + b"|"
        + first.encode()
        + b"|"
        + second.encode()
        + b"|"
        + fingerprint
    )
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def check_proof(
    key: bytes | None, given: object, role: str, first: str, second: str, fingerprint: bytes
) -> None:
    if key is None:
        return
    expected = proof(key, role, first, second, fingerprint)
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthError("the peer could not prove knowledge of the network key")


def check_nonce(value: object) -> str:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise AuthError("handshake: nonce must be 64 hex characters")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise AuthError("handshake: nonce must be 64 hex characters") from None
    return value

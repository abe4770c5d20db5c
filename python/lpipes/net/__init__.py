"""Peer transport: QUIC connections (TLS 1.3), frame streams and the network-key handshake."""

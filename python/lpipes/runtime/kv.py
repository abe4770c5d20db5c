"""Per-session KV storage for the reference executor.

The executor talks to its cache through the small :class:`KVCache` interface
(append the new tokens' K/V of one layer for a batch of sessions, gather each
session's whole K/V for attention, commit or roll back a step, end a session), so
the paged block cache can replace :class:`DenseKVCache` without touching the
executor. Appends are provisional until :meth:`KVCache.commit`: a forward pass that
fails half-way is rolled back and leaves every session as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lpipes.errors import SessionError

SessionId = str


class KVCache(Protocol):
    def length(self, session_id: SessionId) -> int:
        """Committed tokens held for a session (0 for an unknown one)."""

    def append(
        self,
        session_ids: Sequence[SessionId],
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        q_lens: Sequence[int],
    ) -> None:
        """Append the new tokens of one layer.

        key, value: [B, num_kv_heads, Q, head_dim], rows left-padded: sequence b's
        ``q_lens[b]`` new tokens are the last ``q_lens[b]`` of the Q axis.
        """

    def gather(
        self, session_ids: Sequence[SessionId], layer_idx: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each session's K/V of a layer (committed + this step's), right-padded with zeros.

        Returns key, value: [B, num_kv_heads, kv_len, head_dim].
        """

    def commit(self, session_ids: Sequence[SessionId], q_lens: Sequence[int]) -> None:
        """Make this step's appends permanent."""

    def rollback(self, session_ids: Sequence[SessionId]) -> None:
        """Drop this step's appends (after a failed forward pass)."""

    def end(self, session_id: SessionId) -> None:
        """Free a session's storage; an unknown session raises :class:`SessionError`."""


def pad_sessions_kv(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], kv_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-session (key [Hkv, n, D], value [Hkv, n, Dv]) into [B, Hkv, kv_len, D|Dv], zero-padded
    on the right (no copy for a single session that fills kv_len)."""
    if len(parts) == 1 and parts[0][0].shape[1] == kv_len:
        return parts[0][0].unsqueeze(0), parts[0][1].unsqueeze(0)
    k0, v0 = parts[0]
    keys = k0.new_zeros((len(parts), k0.shape[0], kv_len, k0.shape[2]))
    values = v0.new_zeros((len(parts), v0.shape[0], kv_len, v0.shape[2]))
    for b, (k, v) in enumerate(parts):
        keys[b, :, : k.shape[1]] = k
        values[b, :, : v.shape[1]] = v
    return keys, values


@dataclass
class _Session:
    length: int = 0
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # [Hkv, T, D] each


class DenseKVCache:
    """Contiguous per-session, per-layer K/V tensors (grown by concatenation).

    Simple and exact; the paged block cache replaces it for real serving.
    """

    def __init__(self) -> None:
        self._sessions: dict[SessionId, _Session] = {}

    @property
    def sessions(self) -> list[SessionId]:
        return list(self._sessions)

    def length(self, session_id: SessionId) -> int:
        s = self._sessions.get(session_id)
        return s.length if s else 0

    def append(
        self,
        session_ids: Sequence[SessionId],
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        q_lens: Sequence[int],
    ) -> None:
        q_pad = key.shape[2]
        for b, (sid, q) in enumerate(zip(session_ids, q_lens)):
            s = self._sessions.setdefault(sid, _Session())
            k_new = key[b, :, q_pad - q :, :]
            v_new = value[b, :, q_pad - q :, :]
            old = s.layers.get(layer_idx)
            if old is None:
                s.layers[layer_idx] = (k_new.clone(), v_new.clone())
            else:
                s.layers[layer_idx] = (torch.cat([old[0], k_new], dim=1), torch.cat([old[1], v_new], dim=1))

    def gather(
        self, session_ids: Sequence[SessionId], layer_idx: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sessions_kv([self._sessions[sid].layers[layer_idx] for sid in session_ids], kv_len)

    def commit(self, session_ids: Sequence[SessionId], q_lens: Sequence[int]) -> None:
        for sid, q in zip(session_ids, q_lens):
            self._sessions[sid].length += q

    def rollback(self, session_ids: Sequence[SessionId]) -> None:
        for sid in set(session_ids):
            s = self._sessions.get(sid)
            if s is None:
                continue
            if s.length == 0:
                del self._sessions[sid]
                continue
            s.layers = {i: (k[:, : s.length], v[:, : s.length]) for i, (k, v) in s.layers.items()}

    def end(self, session_id: SessionId) -> None:
        if self._sessions.pop(session_id, None) is None:
            raise SessionError(f"unknown session {session_id!r}")

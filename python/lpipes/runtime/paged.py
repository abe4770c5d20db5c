"""The paged KV cache (vLLM-style) for the reference executor, over the native ``lpipes._C.PagedKVCache``.

Fixed-size blocks of ``block_size`` token positions come from a pool sized once from a byte
budget; one block holds those positions for every layer of the span, so one block table per
session serves all layers. Storage of layer ``i`` (allocated once, never grown):

* K: ``[num_blocks, num_kv_heads, block_size, head_dim]``
* V: ``[num_blocks, num_kv_heads, block_size, head_dim_v]``

A step is provisional until :meth:`PagedKVCache.commit`: the first :meth:`~PagedKVCache.append`
of a step reserves the blocks every session of the batch needs (all-or-nothing), later layers
only write; :meth:`~PagedKVCache.rollback` drops the step. When the pool has too few free
blocks the step fails with :class:`KVCacheFullError` and nothing changes — a live session is
never evicted.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from lpipes import _C
from lpipes.errors import LpipesError, SessionError
from lpipes.runtime.kv import SessionId, pad_sessions_kv

LayerShape = tuple[int, int, int]
"""``(num_kv_heads, head_dim, head_dim_v)`` of one layer."""

_DTYPE_NAMES = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}
_TORCH_DTYPES = {name: dt for dt, name in _DTYPE_NAMES.items()}


DEFAULT_KV_CACHE_BYTES = 512 * 1024 * 1024  # the [[models]] kv_cache_gb default (0.5)


class KVCacheFullError(LpipesError, RuntimeError):
    """The paged KV cache has no free block for a step; nothing was changed and no session was evicted."""


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be float16, float32 or bfloat16, got {dtype}")
        return _DTYPE_NAMES[dtype]
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be 'float16', 'float32' or 'bfloat16', got {dtype!r}")
    return name


def layer_shapes_of(layers: Sequence[torch.nn.Module]) -> list[LayerShape | None]:
    """Per-layer ``(num_kv_heads, head_dim, head_dim_v)`` of loaded transformers decoder layers.

    Layers that store no K/V of their own (Gemma 4 KV-shared layers, which have no ``k_proj``)
    get ``None``: they read their producer's cache and need no storage.
    """
    shapes: list[LayerShape | None] = []
    for layer in layers:
        attn = layer.self_attn
        head_dim = int(attn.head_dim)
        k_proj = getattr(attn, "k_proj", None)
        if hasattr(attn, "qkv_proj"):  # phi3: fused [q | k | v] rows
            shapes.append((int(attn.config.num_key_value_heads), head_dim, head_dim))
            continue
        if k_proj is None or getattr(attn, "is_kv_shared_layer", False):
            shapes.append(None)
            continue
        heads = int(k_proj.out_features) // head_dim
        v_proj = getattr(attn, "v_proj", None)
        head_dim_v = int(v_proj.out_features) // heads if v_proj is not None else head_dim
        shapes.append((heads, head_dim, head_dim_v))
    return shapes


class PagedKVCache:
    """Paged KV storage of one layer span, implementing the :class:`~lpipes.runtime.kv.KVCache` protocol.

    Args:
        layer_shapes: per layer of the span, ``(num_kv_heads, head_dim, head_dim_v)``, or ``None``
            for a layer without storage (a Gemma 4 KV-shared layer).
        budget_bytes: memory for the pool; it holds ``budget_bytes // block_bytes`` blocks.
        dtype: storage dtype (``float16``, ``float32`` or ``bfloat16``); :meth:`gather` returns it.
        block_size: tokens per block: 8, 16 or 32.
        first_layer: absolute model index of ``layer_shapes[0]`` (the executor passes absolute indices).

    Raises:
        ValueError: bad shapes, a budget smaller than one block, an unknown dtype.
    """

    def __init__(
        self,
        layer_shapes: Sequence[LayerShape | None],
        budget_bytes: int,
        dtype: str | torch.dtype = "float16",
        block_size: int = 16,
        *,
        first_layer: int = 0,
    ) -> None:
        name = _dtype_name(dtype)
        if not layer_shapes:
            raise ValueError("layer_shapes must name at least one layer")
        self._index: dict[int, int] = {}  # absolute layer index -> native layer index
        native_shapes: list[LayerShape] = []
        for i, shape in enumerate(layer_shapes):
            if shape is None:
                continue
            if len(shape) != 3:
                raise ValueError(
                    f"layer_shapes[{i}] must be (num_kv_heads, head_dim, head_dim_v), got {shape!r}"
                )
            self._index[first_layer + i] = len(native_shapes)
            native_shapes.append(tuple(int(x) for x in shape))
        if not native_shapes:
            raise ValueError("layer_shapes has no layer with storage (every entry is None)")
        self.first_layer = first_layer
        self.num_layers = len(layer_shapes)
        self.dtype: torch.dtype = _TORCH_DTYPES[name]
        self.native = _C.PagedKVCache(native_shapes, int(block_size), int(budget_bytes), name)
        self._ids: dict[SessionId, int] = {}  # str session id -> native uint64 id
        self._next_id = itertools.count(1)
        self._pending: dict[SessionId, int] = {}  # tokens appended in the current (uncommitted) step
        self._views: dict[tuple[int, bool], torch.Tensor] = {}

    @classmethod
    def from_budget(
        cls,
        layer_shapes: Sequence[LayerShape | None],
        budget_bytes: int,
        dtype: str | torch.dtype,
        block_size: int = 16,
        *,
        first_layer: int = 0,
    ) -> PagedKVCache:
        """A cache whose pool is as many blocks as ``budget_bytes`` holds (see the class docs)."""
        return cls(layer_shapes, budget_bytes, dtype, block_size, first_layer=first_layer)

    # ------------------------------------------------------------------ counters
    @property
    def block_size(self) -> int:
        return int(self.native.block_size)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return int(self.native.block_bytes)

    @property
    def blocks_total(self) -> int:
        return int(self.native.num_blocks)

    @property
    def blocks_used(self) -> int:
        return int(self.native.blocks_used)

    @property
    def blocks_free(self) -> int:
        return int(self.native.blocks_free)

    @property
    def peak_blocks_used(self) -> int:
        return int(self.native.peak_blocks_used)

    @property
    def sessions(self) -> list[SessionId]:
        return list(self._ids)

    def session_blocks(self, session_id: SessionId) -> int:
        """Blocks a session holds (committed and reserved); unknown sessions raise :class:`SessionError`."""
        return len(self.native.block_table(self._native_id(session_id)))

    def capacity(self, session_id: SessionId) -> int:
        """Token slots reserved for a session (0 for an unknown one)."""
        sid = self._ids.get(session_id)
        return 0 if sid is None else int(self.native.capacity(sid))

    def native_layer(self, layer_idx: int) -> int:
        """The index in :attr:`native` of an absolute layer index (for native attention calls)."""
        return self._layer(layer_idx)

    def native_id(self, session_id: SessionId) -> int:
        """The uint64 id of a session in :attr:`native` (for native attention calls)."""
        return self._native_id(session_id)

    # -------------------------------------------------------------- storage views
    def _layer(self, layer_idx: int) -> int:
        i = self._index.get(layer_idx)
        if i is None:
            lo, hi = self.first_layer, self.first_layer + self.num_layers
            if lo <= layer_idx < hi:
                raise ValueError(f"layer {layer_idx} has no KV storage in this cache (a KV-shared layer)")
            raise ValueError(f"layer {layer_idx} is outside this cache's span [{lo}, {hi})")
        return i

    def _view(self, layer_idx: int, value: bool) -> torch.Tensor:
        key = (layer_idx, value)
        t = self._views.get(key)
        if t is None:
            i = self._layer(layer_idx)
            arr = self.native.v_storage(i) if value else self.native.k_storage(i)
            t = torch.from_numpy(arr)
            if self.dtype == torch.bfloat16:
                t = t.view(torch.bfloat16)  # the native view of bfloat16 storage is uint16 bits
            self._views[key] = t
        return t

    def k_cache(self, layer_idx: int) -> torch.Tensor:
        """Zero-copy K storage of a layer (absolute index).

        Shape [num_blocks, num_kv_heads, block_size, head_dim]; block ``table[i]`` of a session holds
        its positions ``[i * block_size, (i + 1) * block_size)``.
        """
        return self._view(layer_idx, False)

    def v_cache(self, layer_idx: int) -> torch.Tensor:
        """Zero-copy V storage of a layer (absolute index).

        Shape [num_blocks, num_kv_heads, block_size, head_dim_v].
        """
        return self._view(layer_idx, True)

    # ----------------------------------------------------------- KVCache protocol
    def _native_id(self, session_id: SessionId) -> int:
        sid = self._ids.get(session_id)
        if sid is None:
            raise SessionError(f"unknown session {session_id!r}")
        return sid

    def length(self, session_id: SessionId) -> int:
        """Committed tokens held for a session (0 for an unknown one)."""
        sid = self._ids.get(session_id)
        return 0 if sid is None else int(self.native.length(sid))

    def reserve(self, session_ids: Sequence[SessionId], q_lens: Sequence[int]) -> None:
        """Make room for ``q_lens[b]`` new tokens after each session's committed length, all-or-nothing.

        New sessions are created. :meth:`append` calls it on the first layer of a step; an executor
        that writes K/V natively calls it before the step, then :meth:`commit` or :meth:`rollback`.

        Raises:
            KVCacheFullError: the pool lacks blocks; nothing was changed and no session was evicted.
        """
        created: list[SessionId] = []
        done: list[int] = []
        try:
            for sid_str, q in zip(session_ids, q_lens):
                sid = self._ids.get(sid_str)
                if sid is None:
                    sid = self._ids[sid_str] = next(self._next_id)
                    created.append(sid_str)
                self.native.reserve(sid, int(q))
                done.append(sid)
        except _C.KVCacheFullError as e:
            for sid in done:
                self.native.rollback(sid)
            for sid_str in created:
                if not self.native.has(self._ids[sid_str]):
                    del self._ids[sid_str]
            raise KVCacheFullError(
                f"{e}; this step needs room for {sum(int(q) for q in q_lens)} new tokens over "
                f"{len(q_lens)} sessions: end finished sessions or give the cache a larger budget"
            ) from None

    def append(
        self,
        session_ids: Sequence[SessionId],
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        q_lens: Sequence[int],
    ) -> None:
        """Write the new tokens' K/V of one layer (reserving the step's blocks on its first append).

        key: [B, num_kv_heads, Q, head_dim], value: [B, num_kv_heads, Q, head_dim_v], rows
        left-padded: sequence b's ``q_lens[b]`` new tokens are the last ``q_lens[b]`` of the Q axis.

        Raises:
            KVCacheFullError: the pool lacks blocks for the step; nothing was changed.
        """
        layer = self._layer(layer_idx)
        if key.ndim != 4 or value.ndim != 4 or key.shape[0] != len(session_ids):
            raise ValueError(
                f"key/value must be [B={len(session_ids)}, num_kv_heads, Q, head_dim], "
                f"got {list(key.shape)} and {list(value.shape)}"
            )
        # The first append of a step (some session lacks room for its new tokens) reserves for all.
        pairs = zip(session_ids, q_lens)
        if any(s not in self._ids or self.capacity(s) < self.length(s) + q for s, q in pairs):
            self.reserve(session_ids, q_lens)
        q_pad = key.shape[2]
        for b, (sid_str, q) in enumerate(zip(session_ids, q_lens)):
            sid = self._ids[sid_str]
            self._pending[sid_str] = q
            if q == 0:
                continue
            k_new = key[b, :, q_pad - q :, :].transpose(0, 1).to(torch.float32).contiguous()  # [q, Hkv, D]
            v_new = value[b, :, q_pad - q :, :].transpose(0, 1).to(torch.float32).contiguous()
            self.native.write(layer, sid, self.native.length(sid), k_new, v_new)

    def _session_kv(self, sid: int, layer_idx: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n positions of a session: key [Hkv, n, D], value [Hkv, n, Dv]."""
        bs = self.block_size
        table = self.native.block_table(sid)[: (n + bs - 1) // bs]
        idx = torch.tensor(table, dtype=torch.int64)
        out = []
        for value in (False, True):
            store = self._view(layer_idx, value)  # [NB, Hkv, bs, D]
            # Select along the contiguous block axis first: index_select on a permuted view would
            # materialise the whole pool.
            blocks = store.index_select(0, idx).permute(1, 0, 2, 3)  # [Hkv, nb, bs, D]
            out.append(blocks.reshape(blocks.shape[0], -1, blocks.shape[3])[:, :n])
        return out[0], out[1]

    def gather(
        self, session_ids: Sequence[SessionId], layer_idx: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each session's K/V of a layer (committed + this step's), right-padded with zeros.

        Returns key [B, num_kv_heads, kv_len, head_dim] and value [B, num_kv_heads, kv_len, head_dim_v]
        in the cache's dtype.
        """
        self._layer(layer_idx)
        parts = []
        for sid_str in session_ids:
            sid = self._native_id(sid_str)
            n = int(self.native.length(sid)) + self._pending.get(sid_str, 0)
            if n > kv_len:
                raise ValueError(f"session {sid_str!r} holds {n} tokens, more than kv_len={kv_len}")
            parts.append(self._session_kv(sid, layer_idx, n))
        return pad_sessions_kv(parts, kv_len)

    def commit(self, session_ids: Sequence[SessionId], q_lens: Sequence[int]) -> None:
        """Make this step's appends permanent (each session's length grows by its q_len)."""
        for sid_str, q in zip(session_ids, q_lens):
            sid = self._native_id(sid_str)
            self.native.commit(sid, int(self.native.length(sid)) + int(q))
            self._pending.pop(sid_str, None)

    def rollback(self, session_ids: Sequence[SessionId]) -> None:
        """Drop this step's appends and their spare blocks; sessions that had no committed token vanish."""
        for sid_str in set(session_ids):
            self._pending.pop(sid_str, None)
            sid = self._ids.get(sid_str)
            if sid is None:
                continue
            self.native.rollback(sid)
            if not self.native.has(sid):
                del self._ids[sid_str]

    def end(self, session_id: SessionId) -> None:
        """Free a session's blocks; an unknown session raises :class:`SessionError`."""
        sid = self._native_id(session_id)
        self.native.free(sid)
        del self._ids[session_id]
        self._pending.pop(session_id, None)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, first_layer={self.first_layer}, dtype={self.dtype}, "
            f"block_size={self.block_size}, blocks {self.blocks_used}/{self.blocks_total} used, "
            f"{len(self._ids)} sessions)"
        )

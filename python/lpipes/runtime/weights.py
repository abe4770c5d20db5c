"""Weight memory for the native kernels: one anonymous mapping, on transparent huge pages.

A decode step streams every fp16 weight of the span (and the LM head) from DRAM once. On 4 KiB
pages that is a TLB miss and a restart of the hardware prefetchers every 4 KiB; on 2 MiB pages the
stream runs on. The native executor and the native LM head therefore copy their weight matrices
into a :class:`WeightArena`: one private anonymous mapping, aligned to 2 MiB and marked
``MADV_HUGEPAGE``, so that it gets huge pages wherever the kernel's transparent huge pages are
``always`` or ``madvise`` (the usual defaults). Measured on a 2-core Zen 4 VM with the Qwen3-0.6B
shape (docs/architecture.md, CPU kernels): one-stream decode 16.0-17.6 instead of 13.7-14.7 tok/s on
one thread.

Copying also moves the weights off the checkpoint's memory-mapped file pages, which the kernel may
evict and read back from disk under memory pressure. Where the OS has no such mapping or advice
(non-Linux), the arena is an ordinary tensor and everything works the same, only without huge pages.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
# Every tensor starts on a cache line (and a 64-byte SIMD load boundary).
ALIGN_BYTES = 64

_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or 'unavailable'."""
    try:
        text = _THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unavailable"


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


class WeightArena:
    """A fixed-size block of memory that weight tensors are carved from, 64-byte aligned.

    Args:
        nbytes: capacity; :meth:`nbytes_for` sums what a list of tensors needs.

    The tensors it hands out are views of one buffer and keep it alive; the arena object itself
    may be dropped once they are made.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"arena size must be >= 0, got {nbytes}")
        self.nbytes = nbytes
        self.used = 0
        self.huge_pages = False
        if nbytes and hasattr(mmap, "MAP_ANONYMOUS"):
            size = math.ceil((nbytes + HUGE_PAGE_BYTES) / HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
            # Private: shared anonymous memory is shmem, whose huge pages follow another setting.
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            advice = getattr(mmap, "MADV_HUGEPAGE", None)
            if advice is not None:
                try:
                    mapping.madvise(advice)
                    self.huge_pages = transparent_huge_pages() in ("always", "madvise")
                except OSError as exc:  # e.g. a kernel built without THP
                    log.debug("madvise(MADV_HUGEPAGE) failed: %s", exc)
            whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to the mapping
            start = (-whole.data_ptr()) % HUGE_PAGE_BYTES
            self._buffer = whole[start : start + nbytes]
        else:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)

    @staticmethod
    def nbytes_for(shapes: Iterable[tuple[Sequence[int], torch.dtype]]) -> int:
        """Capacity for tensors of these (shape, dtype), each aligned as :meth:`empty` aligns it."""
        return sum(_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in shapes)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.used + nbytes > self.nbytes:
            raise RuntimeError(
                f"weight arena of {self.nbytes} bytes is full ({self.used} used, {nbytes} more wanted)"
            )
        view = self._buffer[self.used : self.used + nbytes].view(dtype).view(tuple(shape))
        self.used += _aligned(nbytes)
        return view

    def copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` (converted to ``dtype``) copied into the arena."""
        out = self.empty(t.shape, dtype or t.dtype)
        out.copy_(t.detach())
        return out

    def cat(self, parts: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``torch.cat(parts)`` along dim 0, written straight into the arena (no temporary)."""
        shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:])
        out = self.empty(shape, dtype or parts[0].dtype)
        row = 0
        for p in parts:
            out[row : row + p.shape[0]].copy_(p.detach())
            row += int(p.shape[0])
        return out

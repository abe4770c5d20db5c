"""The weight arena the native executor and the native LM head keep their fp16 matrices in."""

from __future__ import annotations

import sys

import pytest
import torch

from lpipes.models.checkpoint import open_checkpoint
from lpipes.models.end_model import EndModel
from lpipes.runtime.weights import ALIGN_BYTES, WeightArena, transparent_huge_pages


def test_copy_and_cat_hold_the_values_aligned():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=g)
    parts = [torch.randn(3, 5, generator=g).half(), torch.randn(2, 5, generator=g).half()]
    arena = WeightArena(WeightArena.nbytes_for([(a.shape, torch.float16), ((5, 5), torch.float16)]))
    x = arena.copy(a, torch.float16)
    y = arena.cat(parts)
    assert x.dtype == torch.float16 and torch.equal(x, a.half())
    assert y.shape == (5, 5) and torch.equal(y, torch.cat(parts))
    assert x.is_contiguous() and y.is_contiguous()
    assert x.data_ptr() % ALIGN_BYTES == 0 and y.data_ptr() % ALIGN_BYTES == 0
    assert y.data_ptr() >= x.data_ptr() + x.numel() * 2  # no overlap
    a.zero_()
    assert x.abs().sum() > 0  # a copy, not a view of the source


def test_a_full_arena_refuses_more():
    arena = WeightArena(WeightArena.nbytes_for([((4, 4), torch.float16)]))
    arena.empty((4, 4), torch.float16)
    with pytest.raises(RuntimeError, match="full"):
        arena.empty((1,), torch.float16)
    with pytest.raises(ValueError):
        WeightArena(-1)


def _vm_flags(address: int) -> list[str]:
    """VmFlags of this process's mapping that holds ``address`` (Linux /proc/self/smaps)."""
    inside, flags = False, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    assert flags is not None, "no mapping holds the arena"
    return flags


THP = sys.platform.startswith("linux") and transparent_huge_pages() in ("always", "madvise")


@pytest.mark.skipif(not THP, reason="transparent huge pages are off or unknown here")
def test_the_arena_asks_for_huge_pages():
    arena = WeightArena(3 << 20)
    assert arena.huge_pages
    t = arena.empty((1 << 20,), torch.float16)
    t.fill_(1.0)
    assert t.data_ptr() % (2 << 20) == 0  # starts on a huge-page boundary
    assert "hg" in _vm_flags(t.data_ptr())  # madvise(MADV_HUGEPAGE) is on the mapping


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_native_head_weights_live_in_the_arena(tiny_checkpoint, arch):
    """The native LM head reads a copy in the arena; a tied embedding reads the same copy, so the
    vocabulary matrix is held once. Embeddings and logits match the plain torch end model."""
    path = tiny_checkpoint(arch, dtype="float16")
    ckpt = open_checkpoint(path, layers=None)
    native = EndModel(ckpt, dtype="float16", native_head=True)
    plain = EndModel(ckpt, dtype="float16", tokenizer=native.tokenizer)
    head = native._native_head[3]
    tied = bool(ckpt.text_config.tie_word_embeddings)
    assert tied == (arch == "llama")
    assert native.lm_head.weight.data_ptr() == head.data_ptr()
    assert (native.embed_tokens.weight.data_ptr() == head.data_ptr()) == tied
    assert torch.equal(head, plain.lm_head.weight)
    assert head.data_ptr() % (2 << 20) == 0
    if THP:
        assert "hg" in _vm_flags(head.data_ptr())
    ids = torch.tensor(native.encode_prompt("huge pages"))
    assert torch.equal(native.embed(ids), plain.embed(ids))
    h = torch.randn(3, int(ckpt.text_config.hidden_size))
    torch.testing.assert_close(native.logits(h), plain.logits(h), atol=2e-2, rtol=0)

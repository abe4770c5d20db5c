"""The reference executor over the paged cache (float32 storage) vs the dense cache and transformers.

Each model is cut into two spans, each executor with its own paged cache built from its loaded
layers (absolute layer indices, Gemma 4 KV-shared layers without storage). Prefill comes in two
chunks, then decode steps, then a left-padded batch of two sessions with different lengths.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lpipes.generation.loop import Generator
from lpipes.models.checkpoint import open_checkpoint
from lpipes.models.end_model import EndModel
from lpipes.runtime.paged import KVCacheFullError, PagedKVCache, layer_shapes_of
from lpipes.runtime.reference import ReferenceExecutor

ARCHS = ["qwen3", "mistral", "gemma3_text", "gemma4_text"]
SPLITS = {"gemma4_text": 1}  # Gemma 4 KV-shared layers (4, 5) must share a span with producers (2, 3)
BLOCK_SIZE = 8
NUM_BLOCKS = 24
PROMPT = "Hello world, the quick brown fox jumps over the lazy dog."


def _build(path, arch):
    end_ckpt = open_checkpoint(path)
    n = end_ckpt.num_layers
    cut = SPLITS.get(arch, 2)
    spans = [(0, cut), (cut, n)]
    dense, paged, caches = [], [], []
    for start, end in spans:
        ckpt = open_checkpoint(path, layers=(start, end), end_model=False)
        d = ReferenceExecutor(ckpt, start, end, dtype="float32")
        shapes = layer_shapes_of(d.layers)
        per_block = sum(h * BLOCK_SIZE * (a + b) * 4 for h, a, b in filter(None, shapes))
        cache = PagedKVCache.from_budget(
            shapes, NUM_BLOCKS * per_block, "float32", BLOCK_SIZE, first_layer=start
        )
        dense.append(d)
        paged.append(ReferenceExecutor(ckpt, start, end, dtype="float32", cache=cache))
        caches.append(cache)
    end_model = EndModel(end_ckpt, dtype="float32")
    return Generator(end_model, dense), Generator(end_model, paged), caches


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tiny_checkpoint):
    arch = request.param
    path = tiny_checkpoint(arch)
    dense, paged, caches = _build(path, arch)
    full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return arch, dense, paged, caches, full


def test_matches_dense_and_transformers(setup):
    arch, dense, paged, caches, full = setup
    ids = paged.end_model.encode_prompt(PROMPT)
    cut = 7
    diffs_dense, diffs_full = [], []
    try:
        # chunked prefill: [0, cut) then [cut, len)
        outs = []
        for a, b in ((0, cut), (cut, len(ids))):
            ours = paged.forward(["s"], [ids[a:b]], [a])[0]
            ref = dense.forward(["s"], [ids[a:b]], [a])[0]
            diffs_dense.append((ours - ref).abs().max().item())
            outs.append(ours)
        with torch.no_grad():
            out = full(torch.tensor([ids]), use_cache=True)
        diffs_full.append((torch.cat(outs) - out.logits[0]).abs().max().item())
        kv, history = out.past_key_values, list(ids)
        token = int(out.logits[0, -1].argmax())
        for _ in range(6):
            history.append(token)
            ours = paged.forward(["s"], [[token]], [len(history) - 1])[0]
            ref = dense.forward(["s"], [[token]], [len(history) - 1])[0]
            with torch.no_grad():
                out = full(torch.tensor([[token]]), past_key_values=kv, use_cache=True)
            kv = out.past_key_values
            diffs_dense.append((ours - ref).abs().max().item())
            diffs_full.append((ours[-1] - out.logits[0, -1]).abs().max().item())
            token = int(out.logits[0, -1].argmax())
        assert all(c.length("s") == len(history) for c in caches)
        assert all(c.session_blocks("s") == -(-len(history) // BLOCK_SIZE) for c in caches)
    finally:
        paged.end_session("s")
        dense.end_session("s")
    assert max(diffs_dense) < 1e-6, f"{arch}: max |Δ| vs dense cache per step {diffs_dense}"
    assert max(diffs_full) < 1e-4, f"{arch}: max |Δlogits| vs transformers per step {diffs_full}"
    assert all(c.blocks_used == 0 and c.sessions == [] for c in caches)


def test_left_padded_batch(setup):
    arch, dense, paged, caches, _ = setup
    a = paged.end_model.encode_prompt(PROMPT)
    b = a[:5]
    sids = ["x", "y"]
    try:
        steps = [
            ([a, b], [0, 0]),
            ([[11], [12, 13, 14]], [len(a), len(b)]),
            ([[15], [16]], [len(a) + 1, len(b) + 3]),
        ]
        for toks, starts in steps:
            ours = paged.forward(sids, toks, starts)
            ref = dense.forward(sids, toks, starts)
            for o, r in zip(ours, ref):
                assert (o - r).abs().max().item() < 1e-6, arch
        assert caches[0].length("x") == len(a) + 2 and caches[0].length("y") == len(b) + 4
    finally:
        for s in sids:
            paged.end_session(s)
            dense.end_session(s)
    assert all(c.blocks_used == 0 for c in caches)


def test_full_cache_rolls_back_and_keeps_live_session(setup):
    arch, dense, paged, caches, _ = setup
    ids = paged.end_model.encode_prompt(PROMPT)
    try:
        paged.forward(["live"], [ids], [0])
        dense.forward(["live"], [ids], [0])
        used = [c.blocks_used for c in caches]
        too_long = list(range(3, 3 + BLOCK_SIZE * NUM_BLOCKS))
        with pytest.raises(KVCacheFullError, match="KV cache full"):
            paged.forward(["big"], [too_long], [0])
        assert [c.blocks_used for c in caches] == used and all(c.sessions == ["live"] for c in caches)
        ours = paged.forward(["live"], [[5]], [len(ids)])[0]
        ref = dense.forward(["live"], [[5]], [len(ids)])[0]
        assert (ours - ref).abs().max().item() < 1e-6, arch
    finally:
        paged.end_session("live")
        dense.end_session("live")
    assert all(c.blocks_used == 0 for c in caches)

"""The native executor (fused fp16 span) against the reference executor, per supported architecture.

The tiny checkpoints are saved in float16, so the fp32 reference and the native path use the very
same weights; what differs is the native path's fp16 KV cache and its accumulation order. Logits
must agree within FP16_LOGIT_ATOL and greedy tokens must be identical for 32 steps — unless the
reference itself has a near-tie (top-2 logit gap below FP16_TIE_GAP) where they diverge, the
vLLM ``check_logprobs_close`` rule.
"""

from __future__ import annotations

import pytest
import torch

from lpipes.generation.sampling import SamplingParams
from lpipes.runtime.local import build_local_generator
from lpipes.runtime.native import NATIVE_ARCHS, NativeExecutor

# Logits are O(1-3) on these models; fp16 K/V rounding (rel. 2^-11) moves them by ~1e-3.
FP16_LOGIT_ATOL = 2e-2
FP16_TIE_GAP = 2e-2
STEPS = 32


@pytest.fixture(scope="module", params=sorted(NATIVE_ARCHS))
def pair(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param, dtype="float16")
    native = build_local_generator(path, split=[3], dtype="float16", executor="native")
    reference = build_local_generator(path, split=[3], dtype="float32", executor="reference")
    assert all(isinstance(s, NativeExecutor) for s in native.stages)
    return request.param, native, reference


def test_logits_close(pair):
    arch, native, reference = pair
    ids = native.end_model.encode_prompt("Hello world, the quick brown fox jumps over the lazy dog.")
    history, diffs = list(ids), []
    try:
        new, start = ids, 0
        for _ in range(8):
            a = native.forward(["s"], [new], [start])[0]
            b = reference.forward(["s"], [new], [start])[0]
            diffs.append((a - b).abs().max().item())
            token = int(b[-1].argmax())
            start = len(history)
            history.append(token)
            new = [token]
    finally:
        native.end_session("s")
        reference.end_session("s")
    assert max(diffs) < FP16_LOGIT_ATOL, f"{arch}: {diffs}"


def test_greedy_tokens_identical(pair):
    arch, native, reference = pair
    ids = native.end_model.encode_chat([{"role": "user", "content": "Tell me about peer-to-peer inference."}])
    params = SamplingParams(max_tokens=STEPS, ignore_eos=True)
    _, ours, _ = native.generate_text(ids, params)
    _, ref, _ = reference.generate_text(ids, params)
    if ours != ref:
        k = next(i for i, (x, y) in enumerate(zip(ours, ref)) if x != y)
        logits = reference.forward(["t"], [ids + ref[:k]], [0])[0][-1]
        reference.end_session("t")
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        assert gap < FP16_TIE_GAP, f"{arch}: native diverged at step {k}, reference not tied (gap {gap})"


def test_blocks_return_to_zero(pair):
    _, native, _ = pair
    ids = native.end_model.encode_prompt("count the blocks")
    from lpipes.generation.loop import GenerationRequest

    params = SamplingParams(max_tokens=5, ignore_eos=True)
    events = native.generate([GenerationRequest(ids, params), GenerationRequest(ids[:3], params)])
    next(events)
    assert any(s.cache.blocks_used > 0 for s in native.stages)
    events.close()  # an abandoned generation frees its sessions on every stage
    assert all(s.cache.blocks_used == 0 for s in native.stages)
    native.generate_text(ids, params)
    assert all(s.cache.blocks_used == 0 for s in native.stages)


def test_cached_rope_rows_equal_the_rotary_module(pair):
    """Decode steps take RoPE rows from tables computed once per block of positions: they must be
    bit-identical to the architecture's rotary module on exactly the step's positions (else a
    decode step would differ from the same tokens in a prefill)."""
    import lpipes.runtime.native as native_mod

    arch, native, _ = pair
    ex = native.stages[0]
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.tensor([0]),
        torch.tensor([native_mod.ROPE_CACHE_BLOCK - 1]),
        torch.tensor([native_mod.ROPE_CACHE_BLOCK + 5]),  # grows the tables
        torch.randint(0, 3000, (7,), generator=g),
        torch.randint(0, 3000, (200,), generator=g),  # the aminmax branch
    ]
    for positions in batches:
        lens = [int(positions.numel())]
        want = ex._computed_rope(positions, lens)
        got = ex._rope_tables(positions, lens)
        for w, o in zip(want[0] + want[1], got[0] + got[1]):
            assert torch.equal(w, o), f"{arch}: cached RoPE rows differ at {positions.tolist()[:8]}"
    if not ex._rope_per_sequence:
        assert ex._rope_rows >= 2 * native_mod.ROPE_CACHE_BLOCK
    # Outside [0, ROPE_CACHE_MAX) the module computes the rows itself.
    assert ex._cached_rope(torch.tensor([native_mod.ROPE_CACHE_MAX])) is None
    assert ex._cached_rope(torch.tensor([-1])) is None

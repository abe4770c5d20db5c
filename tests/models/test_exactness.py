"""Split execution vs transformers' full model, fp32, for every supported architecture.

Each model is cut into three spans, every span an executor built from the checkpoint
alone; hidden states pass between them as they will between peers. Logits must match
the full model within 1e-4 at prefill and at every decode step, and greedy tokens must
equal ``model.generate`` — alone and for a left-padded batch of two prompts.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lpipes.generation.loop import GenerationRequest
from lpipes.generation.sampling import SamplingParams
from lpipes.models.tiny import TINY_ARCHS
from lpipes.runtime.local import build_local_generator

ATOL = 1e-4
DECODE_STEPS = 8
GREEDY_TOKENS = 32
# Gemma 4 KV-shared layers (4, 5) must share a span with their producers (2, 3).
SPLITS = {arch: [2, 4] for arch in TINY_ARCHS} | {"gemma4_text": [1, 2]}
PROMPTS = ["Hello world, the quick brown fox jumps over the lazy dog.", "Grüße aus Köln 🚀"]


def _full_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare exactly GREEDY_TOKENS tokens
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=TINY_ARCHS)
def setup(request, tiny_checkpoint):
    arch = request.param
    path = tiny_checkpoint(arch)
    generator = build_local_generator(path, split=SPLITS[arch], dtype="float32")
    assert len(generator.stages) == 3
    return arch, generator, _full_model(path)


def test_prefill_and_decode_logits(setup):
    arch, gen, full = setup
    ids = gen.end_model.encode_prompt(PROMPTS[0])
    with torch.no_grad():
        out = full(torch.tensor([ids]), use_cache=True)
    ours = gen.forward(["s"], [ids], [0])[0]
    diffs = [(ours - out.logits[0]).abs().max().item()]
    cache, history = out.past_key_values, list(ids)
    token = int(out.logits[0, -1].argmax())
    try:
        for _ in range(DECODE_STEPS):
            history.append(token)
            ours = gen.forward(["s"], [[token]], [len(history) - 1])[0]
            with torch.no_grad():
                out = full(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            diffs.append((ours[-1] - out.logits[0, -1]).abs().max().item())
            token = int(out.logits[0, -1].argmax())
    finally:
        gen.end_session("s")
    assert max(diffs) < ATOL, f"{arch}: max |Δlogits| per step {diffs}"


def test_greedy_tokens_equal_generate(setup):
    arch, gen, full = setup
    ids = gen.end_model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    expected = full.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)[
        0, len(ids) :
    ]
    _, tokens, finish = gen.generate_text(ids, SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True))
    assert tokens == expected.tolist(), arch
    assert finish == "length"


def test_left_padded_batch(setup):
    arch, gen, full = setup
    tok = gen.end_model.tokenizer
    prompts = [gen.end_model.encode_prompt(p) for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])
    batch = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    assert tok.padding_side == "left"

    # Logits of every real prompt position, both sequences in one batched call.
    with torch.no_grad():
        ref = full(**batch).logits
    ours = gen.forward(["a", "b"], prompts, [0, 0])
    gen.end_session("a")
    gen.end_session("b")
    for i, ids in enumerate(prompts):
        diff = (ours[i] - ref[i, -len(ids) :]).abs().max().item()
        assert diff < ATOL, f"{arch}: sequence {i} prefill |Δlogits| {diff}"

    expected = full.generate(**batch, max_new_tokens=GREEDY_TOKENS, do_sample=False)[
        :, batch["input_ids"].shape[1] :
    ]
    params = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
    requests = [GenerationRequest(ids, params, request_id=f"r{i}") for i, ids in enumerate(prompts)]
    got: dict[str, list[int]] = {"r0": [], "r1": []}
    for event in gen.generate(requests):
        got[event.request_id].append(event.token)
    assert got["r0"] == expected[0].tolist(), arch
    assert got["r1"] == expected[1].tolist(), arch
    for stage in gen.stages:
        assert stage.cache.sessions == []

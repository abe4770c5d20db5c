"""Unit tests for lpipes.generation.sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lpipes.errors import LpipesError
from lpipes.generation import Sampler, SampleResult, SamplingParams, SamplingParamsError
from lpipes.generation.sampling import apply_penalties, apply_sampling_filters

EOS = 3


def _sampler(eos: tuple[int, ...] = (EOS,), prompt_ids: tuple[int, ...] = (), **params: object) -> Sampler:
    return Sampler(SamplingParams(**params), eos_token_ids=eos, prompt_ids=prompt_ids)  # type: ignore[arg-type]


def _kept(filtered: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(filtered)).flatten().tolist()


# ---------------------------------------------------------------- SamplingParams


def test_defaults_are_valid_and_greedy() -> None:
    p = SamplingParams()
    assert p.greedy and not p.has_penalties
    assert p.max_tokens == 16 and p.stop == () and p.logprobs is None


def test_params_are_normalised() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[5, 6])  # type: ignore[arg-type]
    assert p.top_k == 0
    assert p.stop == ("###",)
    assert p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    hash(p)  # frozen and hashable


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", 101.0),
        ("temperature", "1.0"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("top_k", -2),
        ("top_k", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", 1e-300),  # divided into a logit it overflowed to inf: NaN probabilities
        ("repetition_penalty", 1e300),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", math.nan),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("logprobs", -1),
        ("logprobs", 21),
        ("seed", 1.5),
        ("stop", ("ok", "")),
        ("stop", (1,)),
        ("stop_token_ids", (-1,)),
        ("ignore_eos", 1),
    ],
)
def test_invalid_params_raise_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=field) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LpipesError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1e-9},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"max_tokens": 1, "min_tokens": 1},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": -(2**70)},
    ],
)
def test_boundary_params_are_accepted(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_min_tokens_message_names_allowed_range() -> None:
    with pytest.raises(SamplingParamsError, match=r"min_tokens must be an int in \[0, max_tokens=4\], got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(100, generator=gen)
        assert _sampler().sample(logits).token == int(torch.argmax(logits))


def test_greedy_ties_go_to_lowest_index() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0])
    assert _sampler().sample(logits).token == 1


def test_tiny_temperature_is_greedy() -> None:
    logits = torch.tensor([0.0, 1.0, 5.0, 1.0])
    assert _sampler(temperature=1e-6).sample(logits).token == 2


def test_greedy_accepts_half_precision_logits() -> None:
    logits = torch.tensor([0.0, 1.0, 5.0, 1.0], dtype=torch.bfloat16)
    assert _sampler().sample(logits).token == 2


def test_sample_rejects_batched_logits() -> None:
    with pytest.raises(ValueError, match=r"1-D logits \[vocab\], got shape \(2, 4\)"):
        _sampler().sample(torch.zeros(2, 4))


# ---------------------------------------------------------------- filters


def test_top_k_one_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    for seed in range(20):
        logits = torch.randn(64, generator=gen)
        s = _sampler(temperature=1.5, top_k=1, seed=seed)
        assert s.sample(logits).token == int(torch.argmax(logits))


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert _kept(apply_sampling_filters(logits, SamplingParams(temperature=1.0, top_k=3))) == [1, 2, 3]


def test_top_p_tiny_keeps_only_the_max() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    params = SamplingParams(temperature=1.0, top_p=1e-6)
    assert _kept(apply_sampling_filters(logits, params)) == [1]
    assert all(_sampler(temperature=1.0, top_p=1e-6, seed=s).sample(logits).token == 1 for s in range(10))


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    cases = {0.5: [0], 0.6: [0, 1], 0.7: [0, 1], 0.8: [0, 1, 2], 0.96: [0, 1, 2, 3, 4]}
    for top_p, expected in cases.items():
        params = SamplingParams(temperature=1.0, top_p=top_p)
        assert _kept(apply_sampling_filters(logits, params)) == expected, top_p


def test_top_p_applies_after_temperature() -> None:
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    # At temperature 0.5 the probabilities become ~[0.76, 0.12, 0.07, 0.03, 0.008].
    params = SamplingParams(temperature=0.5, top_p=0.75)
    assert _kept(apply_sampling_filters(logits, params)) == [0]


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()
    # Threshold 0.3 * 0.4 = 0.12: tokens 0, 1 and 2 survive.
    params = SamplingParams(temperature=1.0, min_p=0.3)
    assert _kept(apply_sampling_filters(logits, params)) == [0, 1, 2]
    assert _kept(apply_sampling_filters(logits, SamplingParams(temperature=1.0, min_p=1.0))) == [0]


def test_filters_scale_by_temperature() -> None:
    logits = torch.tensor([1.0, -2.0, 4.0])
    out = apply_sampling_filters(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(out, logits / 2)


def test_filters_reject_greedy_params() -> None:
    with pytest.raises(ValueError, match="greedy"):
        apply_sampling_filters(torch.zeros(3), SamplingParams())


def test_filtered_tokens_are_never_sampled() -> None:
    logits = torch.zeros(10)
    logits[7] = 1.0
    logits[2] = 0.9
    s = _sampler(temperature=1.0, top_k=2, seed=0)
    assert {s.sample(logits).token for _ in range(200)} == {2, 7}


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_hf_style() -> None:
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0, 4.0])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, prompt_ids=[0, 1], generated_ids=[3, 3], params=params)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 3.0, -2.0, 4.0]))
    torch.testing.assert_close(logits, torch.tensor([2.0, -2.0, 3.0, -1.0, 4.0]))  # input untouched


def test_presence_and_frequency_penalties_openai_style() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # Prompt tokens are not penalised by presence / frequency.
    out = apply_penalties(logits, prompt_ids=[0], generated_ids=[1, 2, 2, 2], params=params)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.25, -0.25, 1.0]))


def test_penalties_combine_in_order() -> None:
    logits = torch.tensor([3.0, -1.0, 0.5])
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_penalties(logits, prompt_ids=[2], generated_ids=[0, 0, 1], params=params)
    # token 0: 3 / 1.5 - 1 - 0.5 * 2 = 0; token 1: -1 * 1.5 - 1 - 0.5 = -3; token 2: 0.5 / 1.5.
    torch.testing.assert_close(out, torch.tensor([0.0, -3.0, 0.5 / 1.5]))


def test_negative_presence_penalty_encourages() -> None:
    out = apply_penalties(torch.zeros(3), [], [1], SamplingParams(presence_penalty=-1.0))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.0]))


def test_penalty_rejects_ids_outside_vocab() -> None:
    with pytest.raises(ValueError, match=r"prompt_ids contain token id\(s\) outside .* \[0, 4\)"):
        apply_penalties(torch.zeros(4), [1, 4], [], SamplingParams(repetition_penalty=1.2))


def test_sampler_applies_penalties_to_its_own_history() -> None:
    # Greedy with a strong frequency penalty cycles instead of repeating token 0.
    logits = torch.tensor([1.0, 0.9, 0.8, -5.0])
    s = _sampler(frequency_penalty=2.0)
    assert [s.sample(logits).token for _ in range(4)] == [0, 1, 2, 0]
    assert s.generated_ids == [0, 1, 2, 0]


def test_sampler_repetition_penalty_covers_prompt() -> None:
    logits = torch.tensor([2.0, 1.5, 0.0, -1.0])
    assert _sampler(prompt_ids=(0,), repetition_penalty=2.0).sample(logits).token == 1
    assert _sampler(prompt_ids=(0,)).sample(logits).token == 0


def test_sampler_penalty_matches_pure_function() -> None:
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.7)
    gen = torch.Generator().manual_seed(3)
    prompt = [1, 5, 5, 9]
    s = Sampler(params, eos_token_ids=[], prompt_ids=prompt)
    for _ in range(10):
        logits = torch.randn(16, generator=gen)
        expected = int(torch.argmax(apply_penalties(logits, prompt, s.generated_ids, params)))
        assert s.sample(logits).token == expected


# ---------------------------------------------------------------- stop tokens, min_tokens


def test_min_tokens_suppresses_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 9.0, 8.0])  # EOS (3) then stop id 4 are most likely
    s = _sampler(min_tokens=2, stop_token_ids=(4,))
    assert [s.sample(logits).token for _ in range(3)] == [2, 2, 3]


def test_min_tokens_with_ignore_eos_only_suppresses_stop_ids() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 9.0, 8.0])
    s = _sampler(min_tokens=1, stop_token_ids=(4,), ignore_eos=True)
    assert s.sample(logits).token == 3


def test_min_tokens_applies_when_sampling() -> None:
    logits = torch.tensor([0.0, 0.0, 0.0, 50.0])
    s = _sampler(temperature=1.0, min_tokens=30, seed=0, max_tokens=40)
    assert EOS not in [s.sample(logits).token for _ in range(30)]
    assert s.sample(logits).token == EOS


def test_is_stop_token() -> None:
    s = _sampler(eos=(3, 7), stop_token_ids=(9,))
    assert [t for t in range(12) if s.is_stop_token(t)] == [3, 7, 9]
    s = _sampler(eos=(3, 7), stop_token_ids=(9,), ignore_eos=True)
    assert [t for t in range(12) if s.is_stop_token(t)] == [9]


# ---------------------------------------------------------------- randomness


def _draws(seed: int | None, n: int = 50, vocab: int = 1000) -> list[int]:
    s = _sampler(temperature=1.0, seed=seed)
    return [s.sample(torch.zeros(vocab)).token for _ in range(n)]


def test_same_seed_same_samples() -> None:
    gen = torch.Generator().manual_seed(11)
    logits_seq = [torch.randn(200, generator=gen) for _ in range(30)]
    params = SamplingParams(
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        min_p=0.01,
        seed=1234,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
    )
    runs = []
    for _ in range(2):
        s = Sampler(params, eos_token_ids=[EOS], prompt_ids=[1, 2, 3])
        runs.append([s.sample(x).token for x in logits_seq])
    assert runs[0] == runs[1]
    assert _draws(7) == _draws(7)


def test_different_seeds_differ() -> None:
    assert _draws(1) != _draws(2)
    assert len(set(_draws(1))) > 40  # a flat distribution over 1000 tokens rarely repeats


def test_unseeded_samplers_get_distinct_random_seeds() -> None:
    a, b = _sampler(temperature=1.0), _sampler(temperature=1.0)
    assert a.seed != b.seed
    assert _draws(None) != _draws(None)


def test_sample_distribution_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature = 0.7
    n = 20_000
    s = _sampler(temperature=temperature, seed=42)
    counts = torch.bincount(torch.tensor([s.sample(logits).token for _ in range(n)]), minlength=5).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, chi2  # 4 degrees of freedom: p < 0.0004 for a correct sampler


# ---------------------------------------------------------------- logprobs


def test_logprob_is_raw_log_softmax() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    raw = torch.log_softmax(logits, dim=0)
    # Penalties and temperature change the choice but not the reported distribution.
    s = _sampler(prompt_ids=(1,), repetition_penalty=10.0, logprobs=2)
    result = s.sample(logits)
    assert isinstance(result, SampleResult)
    assert result.token == 2
    assert result.logprob == pytest.approx(float(raw[2]))
    assert [t for t, _ in result.top_logprobs] == [1, 2]
    assert [lp for _, lp in result.top_logprobs] == pytest.approx([float(raw[1]), float(raw[2])])


def test_no_top_logprobs_unless_requested() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert _sampler().sample(logits).top_logprobs == []
    assert _sampler(logprobs=0).sample(logits).top_logprobs == []
    assert len(_sampler(logprobs=20).sample(logits).top_logprobs) == 3  # capped at vocab size

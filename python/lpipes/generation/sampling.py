"""Next-token sampling: parameters, logit processing and seeded draws.

:class:`Sampler` turns the logits of one sequence's next position into a token. The
processing order follows vLLM / Hugging Face semantics:

1. **Repetition penalty** (HF / CTRL style) over every token that occurs in the prompt
   or in the generated text: a positive logit is divided by the penalty, a negative one
   multiplied by it.
2. **Presence / frequency penalties** (OpenAI style) over the generated tokens only:
   ``logit -= presence_penalty * (count > 0) + frequency_penalty * count``.
3. **min_tokens**: while fewer than ``min_tokens`` tokens have been generated, every stop
   token (see :meth:`Sampler.is_stop_token`) gets a logit of ``-inf``.
4. **Selection**: a temperature below ``1e-5`` (in particular 0) means greedy decoding,
   ``argmax`` with ties going to the lowest token id. Otherwise the logits are divided by
   the temperature, filtered by top-k, top-p and min-p (in that order, see
   :func:`apply_sampling_filters`) and a token is drawn with :func:`torch.multinomial`
   from the sampler's own seeded :class:`torch.Generator`.

Reported log-probabilities are those of the *raw* model distribution,
``log_softmax`` of the logits exactly as passed to :meth:`Sampler.sample`, before
penalties, temperature and filtering (vLLM's default). They therefore describe what
the model predicted, independently of the sampling settings.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lpipes.errors import LpipesError

# Temperatures below this are treated as greedy: dividing by them would overflow fp32.
_GREEDY_TEMPERATURE = 1e-5
_MAX_TEMPERATURE = 100.0
# Dividing a logit by a repetition penalty near 0 overflows fp32 to inf, and softmax then gives NaN
# (1e-300 did, through the API). Past these bounds a penalty has no use anyway: 100 all but bans
# every seen token, 0.01 all but forces one.
_MIN_REPETITION_PENALTY = 0.01
_MAX_REPETITION_PENALTY = 100.0
_MAX_LOGPROBS = 20


class SamplingParamsError(LpipesError, ValueError):
    """A sampling parameter is out of range or of the wrong type."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    Instances are immutable and validated on construction (:meth:`validate`); an invalid
    value raises :class:`SamplingParamsError`. ``top_k=-1`` is accepted as "off" and
    stored as 0; ``stop`` may be given as one string or any sequence of strings and
    ``stop_token_ids`` as any sequence of ints — both are stored as tuples.

    Attributes:
        temperature: Softmax temperature in [0, 100]; 0 means greedy (argmax).
        top_k: Keep only the ``top_k`` most likely tokens; 0 (or -1) turns it off.
        top_p: Nucleus sampling: keep the smallest set of most likely tokens whose
            probability mass reaches ``top_p``; in (0, 1], 1 turns it off.
        min_p: Drop tokens whose probability is below ``min_p`` times that of the most
            likely token; in [0, 1], 0 turns it off.
        repetition_penalty: HF-style penalty in [0.01, 100] on tokens seen in prompt or output;
            1 turns it off, values above 1 discourage repetition.
        presence_penalty: OpenAI-style flat penalty in [-2, 2] on generated tokens.
        frequency_penalty: OpenAI-style per-occurrence penalty in [-2, 2] on generated
            tokens.
        seed: Seed of the sampler's random generator; None draws a fresh random seed.
        max_tokens: Most tokens to generate (>= 1).
        min_tokens: Stop tokens are suppressed until this many tokens were generated;
            in [0, max_tokens].
        stop: Strings that end generation; the stop string itself is not emitted.
        stop_token_ids: Token ids that end generation, in addition to EOS.
        ignore_eos: Keep generating after EOS (only ``stop_token_ids``, ``stop`` and
            ``max_tokens`` end generation).
        logprobs: How many top log-probabilities to report per token, in [0, 20];
            None reports none.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if _is_int(self.top_k) and self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Iterable):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, Iterable):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature below 1e-5)."""
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition, presence or frequency penalties is active."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Check every field; raise :class:`SamplingParamsError` naming the first bad one."""

        def bad(name: str, allowed: str) -> SamplingParamsError:
            return SamplingParamsError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def check_real(name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
            value = getattr(self, name)
            allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            if not _is_real(value) or math.isnan(value):
                raise bad(name, allowed)
            if value > hi or value < lo or (lo_open and value == lo):
                raise bad(name, allowed)

        check_real("temperature", 0.0, _MAX_TEMPERATURE)
        check_real("top_p", 0.0, 1.0, lo_open=True)
        check_real("min_p", 0.0, 1.0)
        check_real("presence_penalty", -2.0, 2.0)
        check_real("frequency_penalty", -2.0, 2.0)
        check_real("repetition_penalty", _MIN_REPETITION_PENALTY, _MAX_REPETITION_PENALTY)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0 or -1 means no top-k filtering)")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an int or None")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a string or a sequence of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a sequence of token ids (ints >= 0)")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= _MAX_LOGPROBS
        ):
            raise bad("logprobs", f"None or an int in [0, {_MAX_LOGPROBS}]")


@dataclass
class SampleResult:
    """One sampled token.

    Attributes:
        token: The chosen token id.
        logprob: Its log-probability under the raw model distribution
            (``log_softmax`` of the logits before penalties, temperature and filtering).
        top_logprobs: The ``params.logprobs`` most likely ``(token_id, logprob)`` pairs
            of the same distribution, most likely first; empty when ``logprobs`` is None
            or 0.
    """

    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def _check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{what} contain token id(s) outside the logits' vocabulary [0, {vocab_size}): "
            f"min {int(ids.min())}, max {int(ids.max())}; the tokenizer and model vocabularies disagree"
        )


def _penalize(
    logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """Apply the repetition, presence and frequency penalties out of place.

    Args:
        logits: ``[vocab]`` float logits.
        seen: ``[vocab]`` bool, True for tokens in the prompt or the generated text.
        counts: ``[vocab]`` float, how often each token was generated.
        params: The penalties to apply.

    Returns:
        The penalised ``[vocab]`` logits (a new tensor).
    """
    out = logits.clone()
    if params.repetition_penalty != 1.0:
        penalised = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, penalised, out)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        out = out - params.presence_penalty * (counts > 0).to(out.dtype) - params.frequency_penalty * counts
    return out


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
    params: SamplingParams,
) -> torch.Tensor:
    """Apply repetition, presence and frequency penalties (steps 1 and 2 of the module doc).

    Args:
        logits: ``[vocab]`` float logits of the next position.
        prompt_ids: Prompt token ids (repetition penalty only).
        generated_ids: Token ids generated so far (all three penalties).
        params: Supplies the penalty values.

    Returns:
        The penalised ``[vocab]`` logits as a new tensor; ``logits`` is not modified.
    """
    vocab = logits.shape[-1]
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=logits.device)
    generated = torch.as_tensor(list(generated_ids), dtype=torch.long, device=logits.device)
    _check_ids(prompt, vocab, "prompt_ids")
    _check_ids(generated, vocab, "generated_ids")
    seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
    seen[prompt] = True
    seen[generated] = True
    counts = torch.bincount(generated, minlength=vocab).to(logits.dtype)
    return _penalize(logits, seen, counts, params)


def apply_sampling_filters(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scale by temperature, then apply top-k, top-p and min-p filtering.

    Filtered tokens get a logit of ``-inf``; the most likely token is always kept.
    Tokens tied with the k-th largest logit survive top-k. Top-p keeps the smallest
    set of most likely tokens whose probability sum reaches ``top_p``. Min-p drops
    tokens whose probability (after the previous filters) is below ``min_p`` times the
    largest one. Must not be called for greedy params (temperature below 1e-5).

    Args:
        logits: ``[vocab]`` float logits (already penalised).
        params: Supplies temperature, top_k, top_p and min_p.

    Returns:
        ``[vocab]`` logits ready for ``softmax`` + ``multinomial`` (a new tensor).
    """
    if params.greedy:
        raise ValueError("apply_sampling_filters needs temperature >= 1e-5; greedy decoding uses argmax")
    out = logits / params.temperature
    if 0 < params.top_k < out.shape[-1]:
        kth = torch.topk(out, params.top_k).values[-1]
        out = out.masked_fill(out < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
        out = out.masked_fill(drop, -math.inf)
    if params.min_p > 0.0:
        probs = torch.softmax(out, dim=-1)
        out = out.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return out


class Sampler:
    """Chooses the tokens of one sequence, one position at a time.

    The sampler records every token it returns: :meth:`sample` appends its choice to
    :attr:`generated_ids`, which feeds the penalties and ``min_tokens``. So call
    :meth:`sample` exactly once per generated position, with the logits of that
    position. Deciding when generation ends is the caller's job (:meth:`is_stop_token`,
    ``params.max_tokens``, :class:`~lpipes.generation.StopStringMatcher`).

    Random draws come from the sampler's own :class:`torch.Generator`, seeded with
    ``params.seed`` or, when that is None, with a fresh random 63-bit seed (exposed as
    :attr:`seed`). The generator lives on the device of the first logits that need a
    random draw. Same seed and same sequence of logits give the same tokens.

    Args:
        params: The sampling parameters.
        eos_token_ids: The model's end-of-sequence token ids.
        prompt_ids: The prompt's token ids (for the repetition penalty).
    """

    def __init__(
        self, params: SamplingParams, *, eos_token_ids: Iterable[int], prompt_ids: Sequence[int] = ()
    ) -> None:
        self.params = params
        self.eos_token_ids: frozenset[int] = frozenset(int(t) for t in eos_token_ids)
        self.prompt_ids: tuple[int, ...] = tuple(int(t) for t in prompt_ids)
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self.eos_token_ids
        self._stop_ids: tuple[int, ...] = tuple(sorted(stops))
        self._generated: list[int] = []
        self._generator: torch.Generator | None = None
        # [vocab] state for the penalties, built on the first call when any penalty is on.
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def generated_ids(self) -> list[int]:
        """A copy of the token ids sampled so far, oldest first."""
        return list(self._generated)

    def is_stop_token(self, token: int) -> bool:
        """True if ``token`` ends generation: an EOS id (unless ``ignore_eos``) or a stop_token_id."""
        return token in self._stop_ids

    def _penalty_state(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen is None or self._counts is None:
            prompt = torch.tensor(self.prompt_ids, dtype=torch.long, device=device)
            _check_ids(prompt, vocab, "prompt_ids")
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._seen[prompt] = True
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        return self._seen, self._counts

    def _draw(self, probs: torch.Tensor) -> int:
        if self._generator is None:
            self._generator = torch.Generator(device=probs.device)
            self._generator.manual_seed(self.seed)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())

    def sample(self, logits: torch.Tensor) -> SampleResult:
        """Choose the next token and record it in :attr:`generated_ids`.

        Args:
            logits: ``[vocab]`` logits of the next position (any float dtype, any device;
                computed in fp32). Not modified.

        Returns:
            The token with its raw-distribution log-probability and, when
            ``params.logprobs`` is set, the top log-probabilities.
        """
        if logits.dim() != 1:
            raise ValueError(f"Sampler.sample expects 1-D logits [vocab], got shape {tuple(logits.shape)}")
        params = self.params
        raw = logits.detach().float()
        vocab = raw.shape[0]
        processed = raw
        if params.has_penalties:
            seen, counts = self._penalty_state(vocab, raw.device)
            processed = _penalize(raw, seen, counts, params)
        if len(self._generated) < params.min_tokens and self._stop_ids:
            suppress = torch.tensor(
                [t for t in self._stop_ids if t < vocab], dtype=torch.long, device=raw.device
            )
            processed = processed.index_fill(0, suppress, -math.inf)

        if params.greedy:
            token = int(torch.argmax(processed).item())
        else:
            probs = torch.softmax(apply_sampling_filters(processed, params), dim=-1)
            token = self._draw(probs)

        logprobs = torch.log_softmax(raw, dim=-1)
        top: list[tuple[int, float]] = []
        if params.logprobs:
            values, ids = torch.topk(logprobs, min(params.logprobs, vocab))
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        result = SampleResult(token=token, logprob=float(logprobs[token].item()), top_logprobs=top)

        self._generated.append(token)
        if self._seen is not None and self._counts is not None:
            self._seen[token] = True
            self._counts[token] += 1
        return result


__all__ = [
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "SamplingParamsError",
    "apply_penalties",
    "apply_sampling_filters",
]

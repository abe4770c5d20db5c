"""The origin's generation loop: embed → layer stages → logits → sample → stream.

The loop does not know where the layers run. It drives a chain of *stages*, each an
object with ``start``, ``end``, ``forward(list[SequenceInput]) -> list[Tensor]`` and
``end_session(session_id)`` — an in-process executor today, a network route later.
It keeps each request's token history (the origin's copy, from which a route can be
rebuilt) and runs all active requests of one call in lockstep, one batched forward
pass per step.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from lpipes.errors import ContextLengthError, LayerSpanError, SessionError
from lpipes.generation.detokenize import IncrementalDetokenizer
from lpipes.generation.sampling import Sampler, SamplingParams
from lpipes.generation.stop import StopStringMatcher
from lpipes.models.end_model import EndModel
from lpipes.runtime.reference import SequenceInput

FinishReason = Literal["stop", "length"]


class Stage(Protocol):
    start: int
    end: int

    def forward(self, inputs: Sequence[SequenceInput]) -> list[torch.Tensor]: ...

    def end_session(self, session_id: str) -> None: ...


class PendingStep:
    """A forward pass in flight: its last stage runs elsewhere (a network route, see
    ``RemoteStage.forward_async``) while the caller goes on. :meth:`result` waits and runs the LM head."""

    def __init__(
        self,
        remote: concurrent.futures.Future | None,
        finish: Callable[[list[torch.Tensor] | None], list[torch.Tensor | None]],
    ) -> None:
        self.remote = remote
        self._finish = finish

    def done(self) -> bool:
        return self.remote is None or self.remote.done()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (from any thread) once :meth:`result` will not block."""
        if self.remote is None:
            fn()
        else:
            self.remote.add_done_callback(lambda _f: fn())

    def result(self) -> list[torch.Tensor | None]:
        """The step's logits (as :meth:`Generator.forward`); raises what the remote stage raised."""
        return self._finish(None if self.remote is None else self.remote.result())


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    """One generated token of one request.

    ``text`` is the text this token makes safe to show (possibly empty: a partial UTF-8
    character or a possible stop-string prefix is held back); on the last event it also
    carries everything still held back. ``finish_reason`` is set on the last event.
    """

    request_id: str
    index: int
    token: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: FinishReason | None = None


@dataclass
class RequestState:
    """The origin's state of one request: its sampler, detokenizer, stop matcher and token history."""

    request: GenerationRequest
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher | None
    history: list[int]
    n_generated: int = 0


class Generator:
    """Generates text with an :class:`EndModel` and a chain of stages covering all layers."""

    def __init__(self, end_model: EndModel, stages: Sequence[Stage]) -> None:
        spans = [(s.start, s.end) for s in stages]
        expected = 0
        for start, end in spans:
            if start != expected:
                raise LayerSpanError(
                    f"stages {spans} do not form a chain covering layers [0, {end_model.num_layers})"
                )
            expected = end
        if expected != end_model.num_layers:
            raise LayerSpanError(f"stages {spans} do not cover all {end_model.num_layers} layers")
        self.end_model = end_model
        self.stages = list(stages)

    # -------------------------------------------------------------- one pass
    def forward(
        self,
        session_ids: Sequence[str],
        token_ids: Sequence[Sequence[int]],
        start_positions: Sequence[int],
        *,
        last_only: bool = False,
        logits_for: Sequence[bool] | None = None,
    ) -> list[torch.Tensor | None]:
        """Run new tokens of several sessions through every stage; returns each one's [T, vocab] logits
        (``[1, vocab]`` for the last position only with ``last_only``: a prefill then skips the LM head
        for every other prompt token, which for small models costs as much as all the layers).

        With ``last_only`` the sessions' last rows go through the LM head together (one pass over its
        weights for the whole batch), and ``logits_for`` (one flag per session) skips the head for
        sessions that need no logits this step (a prefill chunk before the prompt's last): None there.
        """
        return self.begin_forward(
            session_ids, token_ids, start_positions, last_only=last_only, logits_for=logits_for
        ).result()

    @property
    def has_async_stage(self) -> bool:
        """True if the last stage can run while the caller goes on (see :meth:`begin_forward`)."""
        return bool(self.stages) and hasattr(self.stages[-1], "forward_async")

    def begin_forward(
        self,
        session_ids: Sequence[str],
        token_ids: Sequence[Sequence[int]],
        start_positions: Sequence[int],
        *,
        last_only: bool = False,
        logits_for: Sequence[bool] | None = None,
    ) -> PendingStep:
        """:meth:`forward` in two halves: embed and run every stage here, except a last stage with
        ``forward_async`` (a network route), which is only started; ``result()`` of the returned
        step waits for it and runs the LM head. Between the halves the caller may start other
        sessions' steps (pipelining them through the route)."""
        em = self.end_model
        inputs = []
        ple_all = []
        for sid, ids, start in zip(session_ids, token_ids, start_positions):
            ids_t = torch.tensor(list(ids), dtype=torch.int64)
            hidden = em.embed(ids_t)
            ple_all.append(em.per_layer_inputs(ids_t, hidden))
            # The residual stream travels between stages in float32 (exact for fp16/bf16 embeddings):
            # native spans keep it in float32 inside, so a model cut into spans (in one process or
            # over the network) computes exactly what the uncut model does. Reference spans cast it
            # to their own dtype.
            hidden = hidden.float()
            positions = torch.arange(start, start + len(ids), dtype=torch.int64)
            inputs.append(SequenceInput(sid, hidden, positions))
        remote = None
        for i, stage in enumerate(self.stages):
            for x, ple in zip(inputs, ple_all):
                x.per_layer = None if ple is None else ple[:, stage.start : stage.end]
            if i == len(self.stages) - 1 and hasattr(stage, "forward_async"):
                remote = stage.forward_async(inputs)
                break
            outputs = stage.forward(inputs)
            inputs = [SequenceInput(x.session_id, h, x.positions) for x, h in zip(inputs, outputs)]

        def finish(outputs: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
            xs = inputs
            if outputs is not None:
                xs = [SequenceInput(x.session_id, h, x.positions) for x, h in zip(inputs, outputs)]
            return self._logits(xs, last_only, logits_for)

        return PendingStep(remote, finish)

    def _logits(
        self, inputs: list[SequenceInput], last_only: bool, logits_for: Sequence[bool] | None
    ) -> list[torch.Tensor | None]:
        em = self.end_model
        if not last_only:
            return [em.logits(x.hidden) for x in inputs]
        wanted = [True] * len(inputs) if logits_for is None else list(logits_for)
        if len(wanted) != len(inputs):
            raise ValueError(f"logits_for has {len(wanted)} flags for {len(inputs)} sessions")
        rows = [x.hidden[-1:] for x, w in zip(inputs, wanted) if w]
        if not rows:
            return [None] * len(inputs)
        head = iter(em.logits(torch.cat(rows)).split(1))
        return [next(head) if w else None for w in wanted]

    def end_session(self, session_id: str, *, missing_ok: bool = False) -> None:
        """End a session on every stage (with ``missing_ok``, stages that do not know it are skipped)."""
        for stage in self.stages:
            try:
                stage.end_session(session_id)
            except SessionError:
                if not missing_ok:
                    raise

    # ------------------------------------------------------------ generation
    def check_request(self, request: GenerationRequest, *, context_length: int | None = None) -> None:
        """Raise if the prompt is empty or prompt + max_tokens exceeds the context length (the model's,
        or a smaller ``context_length``, e.g. what a KV pool holds)."""
        n, m = len(request.prompt_ids), request.params.max_tokens
        model_ctx = self.end_model.context_length
        ctx = context_length if context_length is not None else model_ctx
        if n == 0:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if ctx and n + m > ctx:
            limit = (
                f"this model's context length is {ctx} tokens"
                if ctx == model_ctx
                else f"this server's context length is {ctx} tokens (its KV cache pool holds {ctx} tokens)"
            )
            raise ContextLengthError(
                f"{limit}, but {n} prompt tokens + {m} max new tokens "
                f"= {n + m}; shorten the prompt or lower max_tokens",
                prompt_tokens=n,
                max_new_tokens=m,
                context_length=ctx,
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[TokenEvent]:
        """Generate for several requests at once, yielding token events as they are produced.

        Every request's session is ended on all stages when it finishes, and for all
        still-active requests if the caller stops iterating or an error occurs.
        """
        for r in requests:
            self.check_request(r)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        active = {r.request_id: self.new_state(r) for r in requests}
        pending = {rid: list(a.request.prompt_ids) for rid, a in active.items()}  # tokens not yet run
        started: set[str] = set()
        try:
            while active:
                rids = list(active)
                starts = [len(active[r].history) - len(pending[r]) for r in rids]
                started.update(rids)
                logits = self.forward(rids, [pending[r] for r in rids], starts, last_only=True)
                for rid, lg in zip(rids, logits):
                    event = self.advance(active[rid], lg[-1])
                    if event.finish_reason is not None:
                        del active[rid]
                        self.end_session(rid)
                    else:
                        pending[rid] = [event.token]
                    yield event
        finally:
            for rid in active:
                if rid in started:
                    self.end_session(rid)

    def new_state(self, r: GenerationRequest) -> RequestState:
        """A fresh :class:`RequestState` for a (checked) request."""
        return RequestState(
            request=r,
            sampler=Sampler(r.params, eos_token_ids=self.end_model.eos_token_ids, prompt_ids=r.prompt_ids),
            detok=IncrementalDetokenizer(self.end_model.tokenizer, prompt_ids=r.prompt_ids),
            stops=StopStringMatcher(r.params.stop) if r.params.stop else None,
            history=list(r.prompt_ids),
        )

    def advance(self, a: RequestState, logits: torch.Tensor) -> TokenEvent:
        """Sample a request's next token from its next-position logits; the event says if it finished."""
        params = a.request.params
        result = a.sampler.sample(logits)
        a.history.append(result.token)
        a.n_generated += 1
        finish: FinishReason | None = None
        text = ""
        if a.sampler.is_stop_token(result.token):
            finish = "stop"
        else:
            text = a.detok.push(result.token)
            if a.stops is not None:
                text, stopped = a.stops.push(text)
                if stopped:
                    finish = "stop"
        if finish is None and a.n_generated >= params.max_tokens:
            finish = "length"
        if finish is not None and not (a.stops is not None and a.stops.stopped):
            tail = a.detok.flush()
            if a.stops is not None:
                tail, stopped = a.stops.push(tail)
                if stopped:
                    finish = "stop"
                else:
                    tail += a.stops.flush()
            text += tail
        return TokenEvent(
            request_id=a.request.request_id,
            index=a.n_generated - 1,
            token=result.token,
            text=text,
            logprob=result.logprob,
            top_logprobs=result.top_logprobs,
            finish_reason=finish,
        )

    def generate_text(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[str, list[int], FinishReason]:
        """Convenience: generate one completion; returns (text, token ids, finish reason)."""
        text, tokens, finish = [], [], "length"
        for ev in self.generate([GenerationRequest(prompt_ids, params)]):
            text.append(ev.text)
            tokens.append(ev.token)
            if ev.finish_reason:
                finish = ev.finish_reason
        return "".join(text), tokens, finish

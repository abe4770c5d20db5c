"""Continuous batching at the origin: one worker thread steps every active request together.

The :class:`Engine` owns a :class:`~lpipes.generation.loop.Generator` and one worker thread.
Requests are submitted from any thread (the API's event loop) and wait in a FIFO queue;
each step the worker

1. drops cancelled requests (their KV blocks are freed on every stage at once),
2. makes sure this step's new tokens fit every stage's paged KV pool — if the running
   requests' decodes do not fit, the most recently admitted one is *preempted*: its
   sessions are ended and it goes back to the front of the queue with its whole token
   history (prompt and generated tokens) as the prefill to replay later. Its sampler,
   detokenizer and stop matcher are kept, so the text continues exactly where it was;
   no live session is ever evicted without this replay,
3. admits waiting requests (their prompt prefill) while the batch has room
   (``max_batch_size``) and their prompt fits the pools,
4. spends the step's token budget (``max_batch_tokens``): one token for every decoding request
   first, then prompt chunks of at most ``prefill_chunk_tokens`` for prefilling requests in
   admission order — so a long prompt or a flood of new requests delays the running streams by at
   most one budget's worth of prefill per step, never stalls them,
5. runs one batched forward pass for all scheduled requests (prefill chunks and decodes mixed;
   the LM head runs once for the batch, and not for a prompt chunk before the prompt's last)
   and hands each request's :class:`~lpipes.generation.loop.TokenEvent` to its callback.

**Pipelining.** When the last stage is a network route (``RemoteStage``), the running requests are
split into ``pipeline_depth`` *lanes* (each new request joins the smallest), and each lane steps on
its own: while one lane's step travels the route, the worker samples another lane's tokens and runs
the next lane's local span, so the origin and the layer peers compute at the same time and no
request waits for another lane's sampling. Every step above (cancel, preempt, admit, plan) then
applies to one lane when it is between steps; a request in a lane whose step is in flight is only
cancelled or preempted once that step is back. Without a network route there is one lane.

A request whose prompt plus ``max_tokens`` cannot fit a stage's whole pool is refused
at submission (:attr:`Engine.context_length` already accounts for it), so preemption
always makes progress. A full queue refuses new submissions with :class:`EngineBusyError`.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lpipes.errors import ContextLengthError, LpipesError, RouteFailedError
from lpipes.generation.loop import GenerationRequest, Generator, PendingStep, RequestState, TokenEvent
from lpipes.runtime.paged import PagedKVCache

log = logging.getLogger(__name__)

#: Consecutive route failures one request survives (each replays it over a new route).
MAX_FAILOVERS = 3

#: What a request's callback receives: a token event, or the exception that ended the request.
Callback = Callable[[TokenEvent | BaseException], None]


class EngineBusyError(LpipesError, RuntimeError):
    """The engine's queue is full (or it is shutting down); the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLargeError(LpipesError, ValueError):
    """More sequences in one submission than the engine can ever hold (batch plus queue)."""


class RequestCancelled(LpipesError):
    """Delivered to a request's callback when it was cancelled before finishing."""


@dataclass
class _Entry:
    state: RequestState
    callback: Callback
    pending: list[int]  # tokens not yet run through the layers
    step_tokens: int = 0  # how many of them this step runs (0: sits this step out)
    lane: int = 0
    preempted: int = 0
    failovers: int = 0

    @property
    def rid(self) -> str:
        return self.state.request.request_id


@dataclass
class EngineStats:
    active: int = 0
    queued: int = 0
    served: int = 0
    preempted: int = 0
    failovers: int = 0
    tokens_generated: int = 0
    steps: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


@dataclass
class _Lane:
    """Requests that step together; each lane has at most one step in flight."""

    index: int
    entries: list[_Entry] = field(default_factory=list)  # admission order
    step: PendingStep | None = None
    batch: list[_Entry] = field(default_factory=list)  # the entries of the step in flight


def _paged_caches(generator: Generator) -> list[PagedKVCache]:
    return [c for s in generator.stages if isinstance(c := getattr(s, "cache", None), PagedKVCache)]


class Engine:
    """Runs generation requests with continuous batching on one worker thread.

    Args:
        generator: the end model and the chain of stages.
        max_batch_size: most requests stepped together.
        max_queued: most requests waiting for admission; more are refused with
            :class:`EngineBusyError`.
        max_batch_tokens: most tokens one step runs (decodes count one each); at least
            ``max_batch_size`` so that a prefill always progresses.
        prefill_chunk_tokens: most prompt tokens of one request in one step.
        pipeline_depth: lanes of requests with a step in flight at once when the last stage is a
            network route (else 1).
    """

    def __init__(
        self,
        generator: Generator,
        *,
        max_batch_size: int = 16,
        max_queued: int = 64,
        max_batch_tokens: int = 2048,
        prefill_chunk_tokens: int = 512,
        pipeline_depth: int = 2,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be at least 0, got {max_queued}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be at least 1, got {prefill_chunk_tokens}")
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be at least 1, got {pipeline_depth}")
        if max_batch_tokens < max_batch_size:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be at least max_batch_size ({max_batch_size})"
            )
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.pipeline_depth = pipeline_depth if generator.has_async_stage else 1
        self._lanes = [_Lane(i) for i in range(self.pipeline_depth)]
        self.caches = _paged_caches(generator)
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._running: list[_Entry] = []  # admission order
        self._cancel: set[str] = set()
        self._known: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="lpipes-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- public face
    @property
    def context_length(self) -> int:
        """Most tokens (prompt + generated) one request may hold: the model's context length, or less
        when a stage's KV pool holds fewer tokens."""
        ctx = self.generator.end_model.context_length or 0
        pools = [c.blocks_total * c.block_size for c in [*self.caches, *self._remote_pools()]]
        limits = [x for x in [ctx, *pools] if x]
        return min(limits) if limits else 0

    @property
    def alive(self) -> bool:
        """True while the worker thread runs and the engine accepts requests."""
        return self._thread.is_alive() and not self._stopping

    def submit(self, requests: Sequence[GenerationRequest], callback: Callback) -> None:
        """Queue requests (all or none); ``callback`` gets every event of each, from the worker thread.

        Raises:
            ContextLengthError: a prompt plus its ``max_tokens`` exceeds :attr:`context_length`.
            EngineBusyError: the queue is full.
        """
        for r in requests:
            self.generator.check_request(r, context_length=self.context_length)
        states = [self.generator.new_state(r) for r in requests]
        with self._cv:
            if self._stopping:
                raise EngineBusyError("the server is shutting down")
            ids = [r.request_id for r in requests]
            if len(set(ids)) != len(ids) or self._known.intersection(ids):
                raise ValueError("request ids must be unique")
            if len(requests) > self.max_batch_size + self.max_queued:
                raise RequestTooLargeError(
                    f"{len(requests)} sequences in one request, but this server holds at most "
                    f"{self.max_batch_size + self.max_queued} (max_batch_size + max_queued_requests); "
                    "lower n or send fewer prompts"
                )
            free_slots = self.max_batch_size - len(self._running)
            if len(self._waiting) + len(requests) - max(free_slots, 0) > self.max_queued:
                raise EngineBusyError(
                    f"the server is at capacity ({len(self._running)} running, {len(self._waiting)} "
                    f"queued, queue limit {self.max_queued}); retry shortly"
                )
            for st in states:
                self._waiting.append(_Entry(st, callback, list(st.request.prompt_ids)))
                self._known.add(st.request.request_id)
            self.stats.queued = len(self._waiting)
            self._cv.notify()

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Stop requests (queued or running) and free their KV blocks at the next step boundary."""
        with self._cv:
            self._cancel.update(r for r in request_ids if r in self._known)
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the worker thread."""
        with self._cv:
            self._stopping = True
            self._cancel.update(self._known)
            self._cv.notify()
        self._thread.join(timeout)

    # ----------------------------------------------------------------- worker
    def _finish(self, e: _Entry, outcome: TokenEvent | BaseException | None, running: bool) -> None:
        if running:
            self.generator.end_session(e.rid, missing_ok=True)
        self._known.discard(e.rid)
        self.stats.active = len(self._running)
        self.stats.queued = len(self._waiting)
        if outcome is not None:
            e.callback(outcome)

    @staticmethod
    def _blocks_needed(cache: PagedKVCache, e: _Entry, tokens: int) -> int:
        # After the step the session holds its history up to the pending tokens, plus ``tokens`` of them.
        held = math.ceil(cache.capacity(e.rid) / cache.block_size)
        after = len(e.state.history) - len(e.pending) + tokens
        return max(0, math.ceil(after / cache.block_size) - held)

    def _fits(self, plan: Sequence[tuple[_Entry, int]]) -> bool:
        for cache in self.caches:
            if sum(self._blocks_needed(cache, e, n) for e, n in plan) > cache.blocks_free:
                return False
        return True

    def _remote_pools(self) -> list[Any]:
        """The KV pools of the layer peers on the network route (``RemoteStage.kv_pools``)."""
        return [p for s in self.generator.stages if hasattr(s, "kv_pools") for p in s.kv_pools()]

    def _fits_remote(self, plan: Sequence[tuple[_Entry, int]], others: int = 0) -> bool:
        """The plan fits the network route's pools (``RemoteStage.kv_pools``) with a block to spare
        for each of ``others`` running requests (other lanes, whose next step may need one): the
        engine preempts and admits for layer peers' pools as for its own, instead of failing steps
        over on a full peer."""
        for pool in self._remote_pools():
            if sum(self._blocks_needed(pool, e, n) for e, n in plan) + others > pool.blocks_free:
                return False
        return True

    def _outgrows_remote(self, e: _Entry) -> ContextLengthError | None:
        """The error for a request that cannot fit a route's pool even when empty (the route changed
        to smaller peers after it was queued), else None."""
        need = len(e.state.history) + e.state.request.params.max_tokens - e.state.n_generated
        for pool in self._remote_pools():
            if need > pool.blocks_total * pool.block_size:
                return ContextLengthError(
                    f"this request needs {need} token positions of KV cache, but peer {pool.node_id} on "
                    f"the network route holds {pool.blocks_total * pool.block_size} in all",
                    prompt_tokens=len(e.state.history),
                    max_new_tokens=e.state.request.params.max_tokens,
                    context_length=pool.blocks_total * pool.block_size,
                )
        return None

    def _plan(self, entries: Sequence[_Entry]) -> list[tuple[_Entry, int]]:
        """Split the step's token budget: decodes first, then prompt chunks in admission order."""
        budget = self.max_batch_tokens
        counts = {}
        for e in entries:
            if len(e.pending) == 1:
                counts[id(e)] = 1
                budget -= 1
        for e in entries:
            if len(e.pending) > 1:
                n = max(0, min(len(e.pending), self.prefill_chunk_tokens, budget))
                counts[id(e)] = n
                budget -= n
        return [(e, counts[id(e)]) for e in entries]

    def _remove(self, e: _Entry) -> None:
        self._running.remove(e)
        self._lanes[e.lane].entries.remove(e)

    def _schedule(self, lane: _Lane) -> list[_Entry]:
        """Pick ``lane``'s next batch and set each entry's ``step_tokens`` (lock held, lane idle)."""
        if self._cancel:
            for e in [e for e in lane.entries if e.rid in self._cancel]:
                self._remove(e)
                self._finish(e, RequestCancelled(f"request {e.rid} was cancelled"), running=True)
            for e in [e for e in self._waiting if e.rid in self._cancel]:
                self._waiting.remove(e)
                self._finish(e, RequestCancelled(f"request {e.rid} was cancelled"), running=False)
            # Requests of lanes with a step in flight stay marked until that step is back.
            self._cancel &= {e.rid for e in self._running}
        # The lane's requests first; preempt its newest until their next tokens fit.
        while lane.entries and not (self._fits(plan := self._plan(lane.entries)) and self._fits_remote(plan)):
            victim = lane.entries[-1]
            self._remove(victim)
            self.generator.end_session(victim.rid, missing_ok=True)
            victim.pending = list(victim.state.history)
            victim.preempted += 1
            self.stats.preempted += 1
            self._waiting.appendleft(victim)
            log.info("preempted %s (KV pool full); it will be replayed", victim.rid)
        # Admit while the batch has room, this lane is (one of) the smallest, the budget has tokens
        # left and the whole prompt fits the pools.
        while self._waiting and len(self._running) < self.max_batch_size:
            if len(lane.entries) > min(len(x.entries) for x in self._lanes):
                break
            plan = self._plan([*lane.entries, self._waiting[0]])
            if plan[-1][1] == 0:
                break
            head = self._waiting[0]
            whole = [*plan[:-1], (head, len(head.pending))]
            if not self._fits(whole) or not self._fits_remote(whole, len(self._running) - len(lane.entries)):
                too_big = self._outgrows_remote(head)
                if too_big is None:
                    break
                self._waiting.popleft()  # it would hold the queue for ever
                self._finish(head, too_big, running=False)
                continue
            e = self._waiting.popleft()
            e.lane = lane.index
            self._running.append(e)
            lane.entries.append(e)
        self.stats.active = len(self._running)
        self.stats.queued = len(self._waiting)
        batch = []
        for e, n in self._plan(lane.entries):
            e.step_tokens = n
            if n:
                batch.append(e)
        return batch

    def _failover(self, batch: list[_Entry], exc: RouteFailedError) -> None:
        """A hop of the network route failed: end the step's sessions everywhere and queue them
        first, to be replayed from their token history over a new route. A request that failed over
        ``MAX_FAILOVERS`` times in a row gets the error."""
        log.warning("route failed (%s); replaying %d request(s) over a new route", exc, len(batch))
        self.stats.failovers += 1
        with self._cv:
            for e in reversed(batch):
                if e not in self._running:
                    continue
                self._remove(e)
                e.failovers += 1
                if e.failovers > MAX_FAILOVERS:
                    self._finish(e, exc, running=True)
                    continue
                self.generator.end_session(e.rid, missing_ok=True)
                e.pending = list(e.state.history)
                self._waiting.appendleft(e)
            self.stats.active = len(self._running)
            self.stats.queued = len(self._waiting)

    def _step_failed(self, batch: list[_Entry], exc: BaseException) -> None:
        """A route failure replays the step's requests (``_failover``); any other error fails them."""
        if isinstance(exc, RouteFailedError):
            self._failover(batch, exc)
            return
        if isinstance(exc, LpipesError):  # an expected condition (no route, a refused peer): one line
            log.warning("a batched step failed; failing its %d request(s): %s", len(batch), exc)
        else:
            log.error("a batched step failed; failing its %d request(s)", len(batch), exc_info=exc)
        with self._cv:
            for e in batch:
                if e in self._running:
                    self._remove(e)
                self._finish(e, exc, running=True)

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify()

    def _has_work(self) -> bool:
        for lane in self._lanes:
            if lane.step is not None:
                if lane.step.done():
                    return True
            elif lane.entries or self._waiting or self._cancel:
                return True
        return False

    def _start(self, lane: _Lane, batch: list[_Entry]) -> None:
        """Run the batch's local stages and start its remote one (if any)."""
        rids = [e.rid for e in batch]
        starts = [len(e.state.history) - len(e.pending) for e in batch]
        chunks = [e.pending[: e.step_tokens] for e in batch]
        last = [e.step_tokens == len(e.pending) for e in batch]
        try:
            step = self.generator.begin_forward(rids, chunks, starts, last_only=True, logits_for=last)
        except BaseException as exc:  # noqa: BLE001 - every request of the step gets the error
            self._step_failed(batch, exc)
            return
        lane.step, lane.batch = step, batch
        step.add_done_callback(self._notify)

    def _complete(self, lane: _Lane) -> None:
        """Finish the lane's step: LM head, sampling, events."""
        step, batch = lane.step, lane.batch
        lane.step, lane.batch = None, []
        assert step is not None
        try:
            logits = step.result()
        except BaseException as exc:  # noqa: BLE001 - every request of the step gets the error
            self._step_failed(batch, exc)
            return
        self.stats.steps += 1
        self.stats.batch_sizes[len(batch)] += 1
        gen = self.generator
        for e, lg in zip(batch, logits):
            if lg is None:  # a prompt chunk before the last: no token yet
                e.pending = e.pending[e.step_tokens :]
                continue
            try:
                event = gen.advance(e.state, lg[-1])
            except BaseException as exc:  # noqa: BLE001
                with self._cv:
                    self._remove(e)
                    self._finish(e, exc, running=True)
                continue
            self.stats.tokens_generated += 1
            if event.finish_reason is not None:
                with self._cv:
                    self._remove(e)
                    self.stats.served += 1
                    self._finish(e, event, running=True)
            else:
                e.pending = [event.token]
                e.failovers = 0
                e.callback(event)

    def _work(self) -> None:
        stalled = False
        while True:
            with self._cv:
                if stalled:  # nothing could be scheduled last round (no KV room): do not spin
                    self._cv.wait(0.05)
                while not self._has_work():
                    if self._stopping and all(lane.step is None for lane in self._lanes):
                        if not self._running and not self._waiting:
                            return
                    self._cv.wait()
            progressed = False
            for lane in self._lanes:
                if lane.step is not None and lane.step.done():
                    self._complete(lane)
                    progressed = True
                if lane.step is None:
                    with self._cv:
                        batch = self._schedule(lane)
                    if batch:
                        self._start(lane, batch)
                        progressed = True
            stalled = not progressed


__all__ = ["Callback", "Engine", "EngineBusyError", "EngineStats", "RequestCancelled", "RequestTooLargeError"]

"""Continuous batching (Engine): same tokens as one-at-a-time generation, preemption, cancel, capacity."""

from __future__ import annotations

import threading
import time

import pytest

from lpipes.errors import ContextLengthError
from lpipes.generation.engine import Engine, EngineBusyError, RequestCancelled, RequestTooLargeError
from lpipes.generation.loop import GenerationRequest, TokenEvent
from lpipes.generation.sampling import SamplingParams
from lpipes.runtime.local import build_local_generator

TIMEOUT_S = 120


class Collector:
    """Gathers each request's events; ``wait()`` returns when every request ended."""

    def __init__(self, n: int) -> None:
        self.events: dict[str, list[TokenEvent]] = {}
        self.errors: dict[str, BaseException] = {}
        self.n = n
        self.first = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self.ended = 0

    def __call__(self, item: TokenEvent | BaseException) -> None:
        with self._lock:
            if isinstance(item, BaseException):
                self.errors[str(len(self.errors))] = item
                self.ended += 1
            else:
                self.events.setdefault(item.request_id, []).append(item)
                self.first.set()
                if item.finish_reason is not None:
                    self.ended += 1
            if self.ended == self.n:
                self.done.set()

    def wait(self) -> None:
        assert self.done.wait(TIMEOUT_S), "requests did not finish in time"

    def tokens(self, rid: str) -> list[int]:
        return [e.token for e in self.events[rid]]


def _prompts(gen, count: int) -> list[list[int]]:
    em = gen.end_model
    return [em.encode_prompt(f"request number {i}: " + "tell me more " * (i + 1)) for i in range(count)]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("qwen3")


def _block_bytes(model) -> int:
    probe = build_local_generator(model, dtype="float32", executor="reference", kv_cache_bytes=1 << 20)
    return probe.stages[0].cache.block_bytes


@pytest.mark.parametrize("executor", ["reference", "native"])
def test_batched_with_preemption_matches_one_at_a_time(model, executor):
    dtype = "float32" if executor == "reference" else "float16"
    ref = build_local_generator(model, dtype=dtype, executor=executor)
    prompts = _prompts(ref, 4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    expected = [ref.generate_text(p, params)[1] for p in prompts]

    # A pool of 7 blocks of 16 tokens: all four prompts fit at first, their decodes soon do not.
    bb = build_local_generator(model, dtype=dtype, executor=executor).stages[0].cache.block_bytes
    gen = build_local_generator(model, dtype=dtype, executor=executor, kv_cache_bytes=7 * bb)
    engine = Engine(gen, max_batch_size=4)
    try:
        got = Collector(len(prompts))
        reqs = [GenerationRequest(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
        engine.submit(reqs, got)
        got.wait()
        assert not got.errors
        assert [got.tokens(f"r{i}") for i in range(len(prompts))] == expected
        assert engine.stats.preempted > 0
        assert max(engine.stats.batch_sizes) > 1
        assert all(c.blocks_used == 0 for c in engine.caches)
    finally:
        engine.close()


@pytest.mark.parametrize("executor", ["reference", "native"])
def test_chunked_prefill_matches_one_at_a_time(model, executor):
    """Prompts run in chunks of 5 tokens within a budget of 8 tokens a step (mixed with decodes):
    the same greedy tokens as whole-prompt prefills one request at a time."""
    dtype = "float32" if executor == "reference" else "float16"
    ref = build_local_generator(model, dtype=dtype, executor=executor)
    prompts = _prompts(ref, 4)
    assert min(len(p) for p in prompts) > 5
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [ref.generate_text(p, params)[1] for p in prompts]
    gen = build_local_generator(model, dtype=dtype, executor=executor)
    engine = Engine(gen, max_batch_size=4, max_batch_tokens=8, prefill_chunk_tokens=5)
    try:
        got = Collector(len(prompts))
        engine.submit([GenerationRequest(p, params, request_id=f"c{i}") for i, p in enumerate(prompts)], got)
        got.wait()
        assert not got.errors
        assert [got.tokens(f"c{i}") for i in range(len(prompts))] == expected
        # every step stayed within the budget: more steps than the unchunked schedule needs
        assert engine.stats.steps > params.max_tokens + max(len(p) for p in prompts) // 8
        assert all(c.blocks_used == 0 for c in engine.caches)
    finally:
        engine.close()


def test_long_prompt_does_not_stall_a_running_stream(model):
    """A stream is decoding when a long prompt arrives: the stream gets a token in every step while
    the prompt is prefilled chunk by chunk (the budget caps each step's prefill)."""
    gen = build_local_generator(model, dtype="float32", executor="reference")
    engine = Engine(gen, max_batch_size=2, max_batch_tokens=6, prefill_chunk_tokens=4)
    steps_at: dict[str, list[int]] = {}
    lock = threading.Lock()

    class Timed(Collector):
        def __call__(self, item):
            if not isinstance(item, BaseException):
                with lock:
                    steps_at.setdefault(item.request_id, []).append(engine.stats.steps)
            super().__call__(item)

    try:
        got = Timed(2)
        engine.submit(
            [GenerationRequest([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True), "run")], got
        )
        assert got.first.wait(TIMEOUT_S)
        long_prompt = gen.end_model.encode_prompt("tell me more " * 12)
        assert len(long_prompt) > 4 * 6
        submitted = engine.stats.steps
        engine.submit([GenerationRequest(long_prompt, SamplingParams(max_tokens=2), "long")], got)
        got.wait()
        assert not got.errors
        first_long = steps_at["long"][0]
        # the prompt took several steps (4 tokens each at most), and "run" got a token in every one
        assert first_long - submitted >= len(long_prompt) // 4
        during = [s for s in steps_at["run"] if submitted < s <= first_long]
        assert len(during) >= first_long - submitted - 1
        assert all(b - a == 1 for a, b in zip(during, during[1:]))
    finally:
        engine.close()


class ThreadedStage:
    """A span run on its own thread: the shape of ``RemoteStage`` (``forward_async`` returns a future)
    without a network, so the engine's lanes can be checked alone. Not a stand-in for the network:
    tests/integration/test_network.py runs the same engine over real peers."""

    def __init__(self, inner) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.inner, self.start, self.end = inner, inner.start, inner.end
        self.pool = ThreadPoolExecutor(1)
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def _run(self, inputs):
        try:
            return self.inner.forward(inputs)
        finally:
            with self.lock:
                self.in_flight -= 1

    def forward_async(self, inputs):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return self.pool.submit(self._run, list(inputs))

    def forward(self, inputs):
        return self.forward_async(inputs).result()

    def end_session(self, session_id: str) -> None:  # queued behind the steps, like END_SESSION
        self.pool.submit(self.inner.end_session, session_id)


@pytest.mark.parametrize("depth", [1, 3])
def test_pipeline_lanes_keep_steps_in_flight_and_the_same_tokens(model, depth):
    """With an asynchronous last stage the engine keeps ``pipeline_depth`` lanes of requests
    stepping independently (several steps in flight), and every request gets its one-at-a-time
    tokens (also across chunked prompts and lanes of different sizes)."""
    ref = build_local_generator(model, dtype="float16", executor="native")
    prompts = _prompts(ref, 5)
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True) for i in range(5)]
    expected = [ref.generate_text(p, sp)[1] for p, sp in zip(prompts, params)]
    gen = build_local_generator(model, split=[1], dtype="float16", executor="native")
    remote = ThreadedStage(gen.stages[1])
    gen.stages[1] = remote
    engine = Engine(gen, max_batch_size=8, max_batch_tokens=16, prefill_chunk_tokens=6, pipeline_depth=depth)
    try:
        assert engine.pipeline_depth == depth
        got = Collector(len(prompts))
        engine.submit(
            [GenerationRequest(p, sp, request_id=f"p{i}") for i, (p, sp) in enumerate(zip(prompts, params))],
            got,
        )
        got.wait()
        assert not got.errors
        assert [got.tokens(f"p{i}") for i in range(len(prompts))] == expected
        assert remote.most_in_flight == depth
        assert all(c.blocks_used == 0 for c in engine.caches)
    finally:
        engine.close()
        remote.pool.shutdown(wait=True)
    assert remote.inner.cache.blocks_used == 0


class FakeRemotePool:
    """What the engine reads of a layer peer's KV pool (the interface of ``node.RemotePool``), set by
    the test instead of by gossip."""

    def __init__(self, blocks_total: int, blocks_free: int, block_size: int = 16) -> None:
        self.node_id = "peer-x"
        self.block_size, self.blocks_total, self.blocks_free = block_size, blocks_total, blocks_free

    def capacity(self, session_id: str) -> int:
        return 0


def test_a_request_that_outgrows_a_changed_route_fails_without_holding_the_queue(model):
    """The route's peer shrank (another, smaller peer took over the span) between a request's
    submission and its admission: the request gets a ContextLengthError naming the peer instead of
    waiting for ever at the head of the queue, and the request behind it runs."""
    ref = build_local_generator(model, dtype="float16", executor="native")
    small_prompt = ref.end_model.encode_prompt("hello")
    small_params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected_small = ref.generate_text(small_prompt, small_params)[1]
    big_prompt = ref.end_model.encode_prompt("tell me more " * 8)
    big_params = SamplingParams(max_tokens=30, ignore_eos=True)
    need = len(big_prompt) + 30
    assert len(small_prompt) + 8 <= 32 < need <= 128

    gen = build_local_generator(model, split=[1], dtype="float16", executor="native")
    remote = ThreadedStage(gen.stages[1])
    pool = FakeRemotePool(blocks_total=8, blocks_free=0)  # 128 positions, none free yet
    remote.kv_pools = lambda: [pool]
    gen.stages[1] = remote
    engine = Engine(gen, max_batch_size=4)
    try:
        assert engine.context_length == 128
        got = Collector(2)
        engine.submit(
            [
                GenerationRequest(big_prompt, big_params, request_id="big"),
                GenerationRequest(small_prompt, small_params, request_id="small"),
            ],
            got,
        )
        time.sleep(0.3)
        assert not got.events and not got.errors  # both wait for room on the peer
        pool.blocks_total, pool.blocks_free = 2, 2  # the route now holds 32 positions in all
        got.wait()
        assert list(got.events) == ["small"]
        assert got.tokens("small") == expected_small
        (err,) = got.errors.values()
        assert isinstance(err, ContextLengthError)
        assert f"needs {need} token positions" in str(err) and "peer-x" in str(err)
        assert engine.stats.queued == 0 and engine.stats.active == 0
    finally:
        engine.close()
        remote.pool.shutdown(wait=True)


def test_sampled_requests_keep_their_seeded_streams(model):
    gen = build_local_generator(model, dtype="float32", executor="reference")
    prompts = _prompts(gen, 3)
    params = [SamplingParams(temperature=0.9, seed=10 + i, max_tokens=12, ignore_eos=True) for i in range(3)]
    expected = [gen.generate_text(p, sp)[1] for p, sp in zip(prompts, params)]
    engine = Engine(gen, max_batch_size=3)
    try:
        got = Collector(3)
        engine.submit(
            [GenerationRequest(p, sp, request_id=f"s{i}") for i, (p, sp) in enumerate(zip(prompts, params))],
            got,
        )
        got.wait()
        assert [got.tokens(f"s{i}") for i in range(3)] == expected
    finally:
        engine.close()


def test_cancel_frees_blocks_and_queue_limit_refuses(model):
    gen = build_local_generator(model, dtype="float32", executor="reference")
    engine = Engine(gen, max_batch_size=1, max_queued=0)
    try:
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        first = Collector(1)
        engine.submit([GenerationRequest(gen.end_model.encode_prompt("go on"), long, request_id="a")], first)
        assert first.first.wait(TIMEOUT_S)
        with pytest.raises(EngineBusyError, match="capacity"):
            engine.submit([GenerationRequest([1, 2, 3], long, request_id="b")], Collector(1))
        with pytest.raises(RequestTooLargeError, match="at most 1"):
            engine.submit([GenerationRequest([1], long, request_id=f"m{i}") for i in range(2)], Collector(2))
        engine.cancel(["a"])
        first.wait()
        assert isinstance(next(iter(first.errors.values())), RequestCancelled)
        assert all(c.blocks_used == 0 for c in engine.caches)
        again = Collector(1)
        engine.submit([GenerationRequest([1, 2, 3], SamplingParams(max_tokens=3), request_id="b")], again)
        again.wait()
        assert not again.errors
    finally:
        engine.close()


def test_pool_bounds_the_context_length(model):
    gen = build_local_generator(
        model, dtype="float32", executor="reference", kv_cache_bytes=4 * _block_bytes(model)
    )
    engine = Engine(gen)
    try:
        assert engine.context_length == 4 * 16
        with pytest.raises(ContextLengthError, match="KV cache pool holds 64 tokens"):
            engine.submit([GenerationRequest([1] * 40, SamplingParams(max_tokens=30))], Collector(1))
    finally:
        engine.close()

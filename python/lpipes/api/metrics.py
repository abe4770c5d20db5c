"""Prometheus metrics of a serving node (``GET /metrics``).

Counters and histograms are updated by the API as requests flow; the KV-pool and engine
gauges are read live from the engine at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lpipes.generation.engine import Engine

# Latency buckets (seconds): first tokens of long prompts on CPU take seconds, decode steps milliseconds.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, stage_labels: list[str]) -> None:
        self.engine = engine
        self.stage_labels = stage_labels

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("lpipes_kv_blocks_used", "KV cache blocks in use", labels=["layers"])
        total = GaugeMetricFamily("lpipes_kv_blocks_total", "KV cache blocks in the pool", labels=["layers"])
        for label, cache in zip(self.stage_labels, self.engine.caches):
            used.add_metric([label], cache.blocks_used)
            total.add_metric([label], cache.blocks_total)
        yield used
        yield total
        stats = self.engine.stats
        yield GaugeMetricFamily(
            "lpipes_active_sessions", "requests being generated (holding KV blocks)", value=stats.active
        )
        yield GaugeMetricFamily(
            "lpipes_queued_requests", "requests waiting for admission", value=stats.queued
        )
        yield CounterMetricFamily(
            "lpipes_preemptions", "requests preempted for KV space (replayed later)", value=stats.preempted
        )
        yield CounterMetricFamily(
            "lpipes_failovers",
            "steps whose network route failed (their requests were replayed over a new route)",
            value=stats.failovers,
        )
        yield CounterMetricFamily("lpipes_engine_steps", "batched forward steps run", value=stats.steps)
        yield CounterMetricFamily(
            "lpipes_engine_step_sequences",
            "sequences summed over all steps (divided by lpipes_engine_steps: the mean batch size)",
            value=sum(k * v for k, v in stats.batch_sizes.items()),
        )


class Metrics:
    """Every metric of one server, in its own registry (several servers may share a process in tests)."""

    def __init__(self, engine: Engine, stage_labels: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lpipes_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lpipes_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lpipes_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "lpipes_time_to_first_token_seconds",
            "time from request arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lpipes_inter_token_latency_seconds",
            "time between consecutive generated tokens of a request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lpipes_request_duration_seconds",
            "time from request arrival to its last token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine, stage_labels))

"""Reliability under load and faults.

In-process nodes on one event loop over real authenticated QUIC (fast): a frame lost between two live
hops (the connection dropped mid-frame) fails its step within seconds instead of waiting for
``step_timeout_s``, and a slow hop is waited for, not failed.

Real `lpipes serve` processes on 127.0.0.1 (``netharness``): 64 concurrent streams with random client
cancels against a 3-node network (every request completes with transformers' tokens or ends with a
clear error; afterwards no KV block is used anywhere and memory is back to its level before); and a
5-node network with redundant spans under load while layer peers are killed, stopped (SIGSTOP),
slowed, cut mid-frame and restarted (every request completes with the same tokens via failover or
fails cleanly, none hangs, and a restarted peer gets traffic again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import time
from pathlib import Path

import httpx
import pytest
from netharness import (
    Network,
    hf_greedy,
    new_network,
    one_step,
    tiny_network_model,
    transformers_model,
    two_hops,
)

from lpipes.errors import RouteFailedError
from lpipes.node import HEARTBEAT_S, LOST_GRACE_S, PING_TIMEOUT_S, Faults, Node
from lpipes.swarm.planning import Hop


def test_a_frame_lost_between_live_hops_fails_its_step_within_seconds(tiny_checkpoint):
    async def scenario(origin: Node, route: list[Hop], hidden: int) -> None:
        await one_step(origin, route, hidden, "s", 0)  # opens peer-a's link to peer-b
        t0 = time.monotonic()
        with pytest.raises(RouteFailedError, match="lost between hop peer-a and hop peer-b") as info:
            await one_step(origin, route, hidden, "s", 1)  # cut mid-frame: peer-b never gets it
        elapsed = time.monotonic() - t0
        assert info.value.node_id == "peer-b"
        assert elapsed < LOST_GRACE_S + 2 * (HEARTBEAT_S + PING_TIMEOUT_S) + 1.0
        # peer-a reconnects: the next steps go through (a replay would start the session again).
        await one_step(origin, route, hidden, "t", 0)

    asyncio.run(two_hops(tiny_checkpoint("qwen3"), Faults(cut_after=1), scenario))


def test_a_slow_hop_is_waited_for_not_failed(tiny_checkpoint):
    delay_s = LOST_GRACE_S + 1.0  # longer than the loss grace: "queued" is progress, not loss

    async def scenario(origin: Node, route: list[Hop], hidden: int) -> None:
        t0 = time.monotonic()
        out = await one_step(origin, route, hidden, "s", 0)
        assert time.monotonic() - t0 >= delay_s
        assert out.shape == (1, hidden)

    asyncio.run(two_hops(tiny_checkpoint("qwen3"), Faults(delay_ms=delay_s * 1000), scenario))


def test_an_idle_push_stream_stays_open(tiny_checkpoint, caplog):
    """A link's push stream that carries nothing for longer than the server's idle_timeout_s is
    still served afterwards: no refusal, no dropped connection (it used to be taken for a failed
    handshake and its connection closed)."""
    caplog.set_level(logging.INFO, logger="lpipes")

    async def scenario(origin: Node, route: list[Hop], hidden: int) -> None:
        for node in two_hops.nodes:
            node.server.idle_timeout_s = 1.0  # frames only: the QUIC connections keep their 300 s
        await one_step(origin, route, hidden, "s", 0)
        links = dict(origin._links)
        await asyncio.sleep(2.5)  # idle, longer than idle_timeout_s
        await one_step(origin, route, hidden, "s", 1)
        assert origin._links == links  # the same connections carried the second step

    asyncio.run(two_hops(tiny_checkpoint("qwen3"), Faults(), scenario))
    refusals = [r.getMessage() for r in caplog.records if "refus" in r.getMessage()]
    assert not refusals, refusals


def test_faults_parse_and_refuse_unknown_names():
    assert Faults.parse("") == Faults()
    assert Faults.parse("delay_ms=40, cut_after=25") == Faults(40.0, 25)
    assert Faults.parse("claim_delay_ms=3000") == Faults(claim_delay_ms=3000.0)
    with pytest.raises(ValueError, match="unknown fault"):
        Faults.parse("drop=1")


# ---------------------------------------------------------------- real processes
PROMPTS = [
    "The peer network",
    "Hello there, how are you doing today?",
    "a",
    "Batching concurrent sessions' decode steps",
    "one two three four five six seven eight nine ten",
    "Failover replays the token history",
    "x y z",
    "Reliability under load and faults",
]
REQUEST_TIMEOUT_S = 120.0  # no request may take longer: a hang fails the test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_network_model(tmp_path_factory)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers_model(model_dir)


async def _stream(http: httpx.AsyncClient, base: str, prompt: str, n: int, drop_after: int | None) -> dict:
    """One streaming completion: its text, or how it ended (``dropped`` by the client, an ``error``
    event or status with its message)."""
    body = {
        "model": "tiny-qwen3",
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text, chunks = [], 0
    async with http.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            err = json.loads(await r.aread())["error"]
            return {"status": r.status_code, "error": err["message"]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"error": data["error"]["message"], "text": "".join(text)}
            if data["choices"]:
                text.append(data["choices"][0]["text"])
                chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return {"dropped": True}
    return {"text": "".join(text)}


def _load(base: str, jobs: list[tuple[str, int, int | None]]) -> list[dict]:
    """Run ``(prompt, max_tokens, drop_after)`` streams at once; each bounded by REQUEST_TIMEOUT_S."""

    async def one(http: httpx.AsyncClient, job: tuple[str, int, int | None]) -> dict:
        try:
            return await asyncio.wait_for(_stream(http, base, *job), REQUEST_TIMEOUT_S)
        except TimeoutError:
            return {"hung": True}

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=len(jobs) + 4)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            return list(await asyncio.gather(*(one(http, j) for j in jobs)))

    return asyncio.run(run())


def _check_outcomes(jobs, results, expected: dict[tuple[str, int], str]) -> dict[str, int]:
    """Every request either completed with transformers' text, was dropped by its client, or ended
    with a clear error message; none hung. Returns the counts."""
    counts = {"completed": 0, "dropped": 0, "error": 0}
    for (prompt, n, _), res in zip(jobs, results):
        assert not res.get("hung"), f"request {prompt!r} hung"
        if res.get("dropped"):
            counts["dropped"] += 1
        elif "error" in res:
            assert res["error"], res
            counts["error"] += 1
        else:
            assert res["text"] == expected[(prompt, n)], (prompt, res)
            counts["completed"] += 1
    return counts


def _wait_kv_free(net: Network, via: str, names: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    used: dict = {}
    while time.monotonic() < deadline:
        used = net.kv_used(via)
        if names <= set(used) and not any(used[n] for n in names):
            return
        time.sleep(0.3)
    pytest.fail(f"KV blocks still used after the load: {used}")


@pytest.mark.parametrize(
    ("streams", "n_tokens"), [(64, 12), pytest.param(256, 48, marks=pytest.mark.slow, id="256-slow")]
)
def test_concurrent_streams_with_cancels_lose_nothing(tmp_path_factory, model_dir, hf, streams, n_tokens):
    net = new_network(tmp_path_factory, model_dir)
    expected = {(p, n_tokens): hf_greedy(hf, p, n_tokens)[1] for p in PROMPTS}
    rng = random.Random(64)
    try:
        net.start(
            "origin",
            layers="[0, 2]",
            origin=True,
            # every stream its own connection (the default max_connections, 128, would refuse some)
            extra_api=(
                f"max_batch_size = 16\nmax_queued_requests = {streams}\nmax_connections = {streams + 8}"
            ),
        )
        net.start("peer-a", layers="[2, 4]", bootstrap=net.address("origin"))
        net.start("peer-b", layers="[4, 6]", bootstrap=net.address("origin"))
        net.wait_coverage("origin", 3)
        base = net.api("origin")
        names = {"origin", "peer-a", "peer-b"}

        def jobs(k: int) -> list[tuple[str, int, int | None]]:
            return [(rng.choice(PROMPTS), n_tokens, rng.choice([None, None, 1, 4, 8])) for _ in range(k)]

        warm = jobs(32)  # the same kind of load first: allocators and caches reach their steady size
        _check_outcomes(warm, _load(base, warm), expected)
        _wait_kv_free(net, "origin", names)
        before = {n: net.rss_mb(n) for n in names}

        load = jobs(streams)
        t0 = time.monotonic()
        results = _load(base, load)
        elapsed = time.monotonic() - t0
        counts = _check_outcomes(load, results, expected)
        # Nothing failed here: every stream its client read to the end completed.
        assert counts == {
            "completed": sum(d is None for *_, d in load),
            "dropped": sum(d is not None for *_, d in load),
            "error": 0,
        }, counts
        _wait_kv_free(net, "origin", names)
        after = {n: net.rss_mb(n) for n in names}
        for n in names:
            assert after[n] <= before[n] * 1.1 + 32, f"{n}: {before[n]:.0f} MiB before, {after[n]:.0f} after"
        engine = httpx.get(base + "/lpipes/status", timeout=10).json()["engine"]
        assert engine["max_batch_seen"] > 1, engine
        rss = ", ".join(f"{n} {before[n]:.0f}→{after[n]:.0f} MiB" for n in sorted(names))
        print(f"\nload: {streams} streams in {elapsed:.1f} s: {counts}; RSS {rss}")
    finally:
        net.stop_all()


def _route(net: Network) -> list[str]:
    """The node ids of the origin's current route (the last one its log announced)."""
    lines = [ln for ln in net.procs["origin"].log.read_text().splitlines() if "route for layers" in ln]
    if not lines:
        return []
    return [hop.split("[")[0].strip() for hop in lines[-1].rsplit(": ", 1)[1].split("→")]


def test_kill_stop_slow_cut_and_restart_layer_peers_under_load(tmp_path_factory, model_dir, hf):
    net = new_network(tmp_path_factory, model_dir)
    n_tokens = 48
    expected = {(p, n_tokens): hf_greedy(hf, p, n_tokens)[1] for p in PROMPTS}
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        boot = net.address("origin")
        net.start("a1", layers="[2, 4]", bootstrap=boot)
        net.start("a2", layers="[2, 4]", bootstrap=boot, env={"LPIPES_FAULTS": "delay_ms=20"})
        # Every 40th step a [4, 6) peer passes on (its RESULT to the origin) is cut mid-frame.
        net.start("b1", layers="[4, 6]", bootstrap=boot, env={"LPIPES_FAULTS": "cut_after=40"})
        net.start("b2", layers="[4, 6]", bootstrap=boot, env={"LPIPES_FAULTS": "cut_after=40"})
        net.wait_coverage("origin", 5)
        base = net.api("origin")
        jobs = [(PROMPTS[i % len(PROMPTS)], n_tokens, None) for i in range(16)]

        import threading

        results: list[dict] = []
        runner = threading.Thread(target=lambda: results.extend(_load(base, jobs)))
        runner.start()
        # Kill whichever [2, 4) peer carries the load, then stop (SIGSTOP) the [4, 6) peer of the
        # route the origin fails over to.
        killed = stopped = None
        deadline = time.monotonic() + 60
        while runner.is_alive() and time.monotonic() < deadline and stopped is None:
            route = _route(net)
            if killed is None and len(route) == 2:
                killed = route[0]
                time.sleep(0.5)  # a few tokens in
                net.kill(killed)
            elif killed is not None and len(route) == 2 and killed not in route:
                stopped = route[1]
                net.signal(stopped, signal.SIGSTOP)
            time.sleep(0.05)
        if stopped is not None:
            time.sleep(3.0)
            net.signal(stopped, signal.SIGCONT)
        runner.join(REQUEST_TIMEOUT_S + 30)
        assert not runner.is_alive(), "the load did not finish"
        counts = _check_outcomes(jobs, results, expected)
        assert killed is not None and stopped is not None, (killed, stopped, counts)
        assert counts["completed"] >= len(jobs) // 2, counts
        origin_log = net.procs["origin"].log.read_text()
        assert f"peer {killed} marked as failed" in origin_log
        assert f"peer {stopped} marked as failed" in origin_log
        assert "was lost on its way back" in origin_log  # the cut RESULT frames, replayed
        print(
            f"\nfaults: killed {killed}, stopped {stopped} 3 s, cut frames "
            f"{origin_log.count('was lost on its way back')}, failovers "
            f"{origin_log.count('replaying')}: {counts}"
        )

        # The killed peer restarts (same id, same address) and rejoins; once the other peer of its
        # span is gone, it carries the traffic again.
        net.restart(killed)
        other = "a2" if killed == "a1" else "a1"
        net.kill(other)
        net.wait_coverage("origin", 4, timeout=60)
        forwards_before = sum(f["type"] == "FORWARD" for f in net.frames(killed))
        deadline = time.monotonic() + 60
        while True:
            (res,) = _load(base, [(PROMPTS[0], 8, None)])
            if "text" in res or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # the restarted peer is still marked from its failure: wait it out
        assert res.get("text") == hf_greedy(hf, PROMPTS[0], 8)[1], res
        assert sum(f["type"] == "FORWARD" for f in net.frames(killed)) > forwards_before
        _wait_kv_free(net, "origin", {"origin", killed})
    finally:
        net.stop_all()

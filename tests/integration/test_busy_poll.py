"""``[network] busy_poll_us``: a node that sent a step's frame keeps its event loop polling for the next
frame (``lpipes.net.poll``) instead of sleeping; a step frame arriving stops it, and so does the end of
the window. In-process nodes on one event loop over real authenticated QUIC (``netharness.two_hops``)."""

from __future__ import annotations

import asyncio

import torch
from netharness import one_step, two_hops

import lpipes.node
from lpipes.node import INLINE_MAX_TOKENS, Faults

WINDOW_S = 0.3


def _steps(path, busy_poll_s: float) -> tuple[list[torch.Tensor], list[int]]:
    """Three decode steps of one session over origin → peer-a → peer-b → origin; their outputs and
    every node's poll count at the end."""
    outs: list[torch.Tensor] = []
    polls: list[int] = []

    async def scenario(origin, route, hidden) -> None:
        nodes = two_hops.nodes
        peer_a, peer_b = nodes[0], nodes[1]
        gen = torch.Generator().manual_seed(0)
        for pos in range(3):
            x = torch.randn(1, hidden, generator=gen)
            outs.append(await one_step(origin, route, hidden, "s", pos, x))
            # The RESULT stopped the origin's polling (its engine computes now); the hops poll on.
            assert not origin.busy_poll.active
            assert peer_a.busy_poll.active == peer_b.busy_poll.active == (busy_poll_s > 0)
        await asyncio.sleep(WINDOW_S + 0.3)
        assert not any(n.busy_poll.active for n in nodes)
        polls.extend(n.busy_poll.polls for n in nodes)
        await asyncio.sleep(0.1)
        assert [n.busy_poll.polls for n in nodes] == polls  # an idle node sleeps

    asyncio.run(asyncio.wait_for(two_hops(path, Faults(), scenario, busy_poll_s=busy_poll_s), 60))
    return outs, polls


def test_nodes_poll_while_their_step_is_away_and_give_the_same_outputs(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    plain, idle = _steps(path, 0.0)
    assert idle == [0, 0, 0]  # off by default: nothing polls
    polled, polls = _steps(path, WINDOW_S)
    # Every node polled: the origin while each step was away, the hops after passing theirs on.
    assert all(p > 0 for p in polls), polls
    for a, b in zip(plain, polled):
        assert torch.equal(a, b)


def test_a_layer_peer_stops_polling_while_its_compute_thread_runs(tiny_checkpoint, monkeypatch):
    """Prefill-sized steps run on a layer peer's compute thread, batch after batch; the loop does not
    poll meanwhile (the compute thread needs the GIL between its kernels), although sending the first
    batch's output armed it again."""
    monkeypatch.setattr(lpipes.node, "PEER_BATCH_TOKENS", 24)  # two 20-token steps: two batches
    seen: list[bool] = []

    async def scenario(origin, route, hidden) -> None:
        peer_a = two_hops.nodes[0]
        await one_step(origin, route, hidden, "s", 0)
        assert peer_a.busy_poll.active  # polls after passing its decode step on
        computed = peer_a._computed

        async def spy(fn, *args):
            seen.append(peer_a.busy_poll.active)
            return await computed(fn, *args)

        peer_a._computed = spy
        t = INLINE_MAX_TOKENS + 4
        steps = [
            origin.run_step(
                route, [sid], [t], {"hidden": torch.randn(t, hidden), "positions": torch.arange(t)}
            )
            for sid in ("p", "q")
        ]
        outs = await asyncio.gather(*steps)
        assert [o.shape for o in outs] == [(t, hidden)] * 2
        assert peer_a.busy_poll.active  # armed again by the last output it sent

    asyncio.run(
        asyncio.wait_for(two_hops(tiny_checkpoint("qwen3"), Faults(), scenario, busy_poll_s=WINDOW_S), 60)
    )
    assert seen == [False, False]

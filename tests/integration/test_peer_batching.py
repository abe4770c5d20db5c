"""A layer peer batches the FORWARD steps waiting for it into one executor call.

In-process nodes on one event loop, talking real authenticated QUIC on 127.0.0.1: an origin sends
several sessions' steps at once (as several origins, or a pipelined origin, would); the peer runs
them as one batch, and every session gets what its step alone gives. Decode steps after a batched
prefill continue each session's own KV. Both executors: the native fused fp16 span and the
reference executor.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import torch
from netharness import step_node

from lpipes.models.checkpoint import open_checkpoint
from lpipes.node import Node
from lpipes.runtime.local import make_executor
from lpipes.runtime.reference import SequenceInput
from lpipes.swarm.planning import Hop

LENS = [5, 1, 9, 3]  # one prompt chunk per session, different lengths


@pytest.mark.parametrize(("executor", "dtype"), [("native", torch.float16), ("reference", torch.float32)])
def test_peer_batches_concurrent_steps_and_matches_each_alone(tiny_checkpoint, executor, dtype):
    path = tiny_checkpoint("qwen3")
    ckpt = open_checkpoint(path, layers=(0, 2), end_model=False)
    hidden_size = int(ckpt.text_config.hidden_size)

    def span():
        return make_executor(ckpt, 0, 2, dtype=dtype, executor=executor, kv_cache_bytes=1 << 22)

    alone = span()  # the same steps one session at a time, for comparison
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, hidden_size, generator=gen).to(dtype) for n in LENS]
    decodes = [torch.randn(1, hidden_size, generator=gen).to(dtype) for _ in LENS]

    async def scenario() -> tuple[list[torch.Tensor], list[torch.Tensor], Node]:
        key = secrets.token_bytes(32)
        peer = step_node("peer", key, hidden_size)
        origin = step_node("origin", key, hidden_size, end_model=True)
        try:
            await peer.start()
            await origin.start()
            peer.executor, peer.span, peer.ready = span(), (0, 2), True
            route = [Hop("peer", peer.address, 0, 2)]
            # Open the link first, so that the concurrent steps below leave in one burst.
            await origin.run_step(
                route, ["warm"], [1], {"hidden": decodes[0], "positions": torch.tensor([0])}
            )

            async def steps(xs: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
                return list(
                    await asyncio.gather(
                        *(
                            origin.run_step(
                                route,
                                [f"s{i}"],
                                [x.shape[0]],
                                {"hidden": x, "positions": torch.arange(st, st + x.shape[0])},
                            )
                            for i, (x, st) in enumerate(zip(xs, starts))
                        )
                    )
                )

            before = peer.batches
            prefill = await steps(prompts, [0] * len(LENS))
            assert peer.batches - before < len(LENS), "the concurrent steps were not batched"
            decode = await steps(decodes, LENS)
            return prefill, decode, peer
        finally:
            await origin.close()
            await peer.close()

    prefill, decode, peer = asyncio.run(scenario())
    assert peer.batched_jobs > peer.batches
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    for i, n in enumerate(LENS):
        sid = f"s{i}"
        (want,) = alone.forward([SequenceInput(sid, prompts[i], torch.arange(n))])
        torch.testing.assert_close(prefill[i].to(dtype), want, **tol)
        (want,) = alone.forward([SequenceInput(sid, decodes[i], torch.tensor([n]))])
        torch.testing.assert_close(decode[i].to(dtype), want, **tol)

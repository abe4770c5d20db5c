"""``lpipes.net.poll.BusyPoll``: keeps an event loop polling (no sleep in epoll) for a bounded window
after each ``arm``, stops at ``disarm`` or when the window ends; asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from lpipes.net.poll import BusyPoll

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _run(factory, coro):
    loop = factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 10))
    finally:
        loop.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_it_polls_for_the_window_then_lets_the_loop_sleep(loop):
    async def scenario():
        poll = BusyPoll(0.05)
        t0 = time.monotonic()
        poll.arm()
        await asyncio.sleep(0.02)  # timers still fire while it polls
        assert poll.active and poll.polls > 10
        while poll.active:
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - t0
        assert 0.05 <= elapsed < 1.0
        polls = poll.polls
        await asyncio.sleep(0.05)
        assert poll.polls == polls and not poll.active  # nothing turns the loop once it is over

    _run(LOOPS[loop], scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_disarm_stops_it_at_once_and_arm_extends_the_window(loop):
    async def scenario():
        poll = BusyPoll(0.2)
        poll.arm()
        await asyncio.sleep(0)
        poll.disarm()
        polls = poll.polls
        await asyncio.sleep(0.02)
        assert poll.polls == polls and not poll.active
        poll.disarm()  # twice is harmless

        poll = BusyPoll(0.06)
        poll.arm()
        await asyncio.sleep(0.04)
        poll.arm()  # 0.06 s from now, not from the first arm
        await asyncio.sleep(0.04)
        assert poll.active
        poll.disarm()

    _run(LOOPS[loop], scenario())


def test_a_zero_window_never_polls_and_a_negative_one_is_refused():
    async def scenario():
        poll = BusyPoll(0)
        poll.arm()
        await asyncio.sleep(0.01)
        assert not poll.active and poll.polls == 0

    _run(asyncio.new_event_loop, scenario())
    for bad in (-1e-6, float("nan")):
        with pytest.raises(ValueError, match="busy-poll window"):
            BusyPoll(bad)

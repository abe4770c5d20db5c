"""Busy-polling an event loop while a node waits for a step's next frame (``[network] busy_poll_us``).

A decode step crosses every node of its route in turn, so each node waits between its steps while
the others compute. If its event loop sleeps in ``epoll_wait``, the frame that ends the wait has to
wake the CPU first: leaving an idle state (on a virtual machine, a halted vCPU that the host then
re-schedules, ~60-100 µs measured) and running the receive path with cold caches. :class:`BusyPoll`
keeps the loop turning instead (a ``call_soon`` chain makes every loop iteration poll its sockets
without blocking), yielding the CPU to any other runnable thread between polls, for at most the
window after the node sent a step's frame; it stops as soon as a step frame arrives (the wait is
over) or the window ends. The price is a core kept busy during the window: off by default.
"""

from __future__ import annotations

import asyncio
import os
import time

_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


class BusyPoll:
    """Polls the running event loop for up to ``window_s`` after each :meth:`arm` (0: never).

    Call :meth:`arm` and :meth:`disarm` on the loop's thread. ``polls`` counts the loop iterations
    it kept from sleeping.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s >= 0:
            raise ValueError(f"busy-poll window must be >= 0 s, got {window_s!r}")
        self.window_s = float(window_s)
        self.polls = 0
        self._until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None

    @property
    def active(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        """Keep the loop polling until ``window_s`` from now (a running window is extended)."""
        if self.window_s <= 0:
            return
        self._until = time.monotonic() + self.window_s
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._handle = self._loop.call_soon(self._poll)

    def disarm(self) -> None:
        """Stop polling now (the frame waited for has come, or the node closes)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _poll(self) -> None:
        # time.monotonic, not loop.time(): uvloop's clock moves in whole milliseconds.
        if time.monotonic() >= self._until:
            self._handle = None
            return
        self.polls += 1
        _yield()  # let a runnable thread (this process's engine, another process) have the CPU
        assert self._loop is not None
        self._handle = self._loop.call_soon(self._poll)


__all__ = ["BusyPoll"]

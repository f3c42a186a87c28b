"""A server's connection slots: a counter that awaits only when every slot is taken.

`asyncio.Semaphore` would do, but its `acquire` is a coroutine, and it and `release` scan
the waiters even when nobody waits: about 2 µs a request, on the path every request
takes. Here a free slot is taken with one comparison (`take_now`); only a request that
finds none waits (`wait`), in arrival order, and a released slot goes straight to the
longest waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Slots:
    """`limit` slots; one per request on the wire. Used from one event loop."""

    __slots__ = ("free", "_waiters")

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody waits for one (no await); else False."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def wait(self) -> None:
        """Take a slot, waiting for one if none is free (`take_now` first, for speed)."""
        if self.take_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over as this was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the longest waiter still waiting, else to the free count."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1

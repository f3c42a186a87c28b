"""Connection slots: free ones are taken at once, the rest wait in order, none is lost."""

from __future__ import annotations

import asyncio

from modelfleet._transports.slots import Slots


async def test_waiters_get_released_slots_in_arrival_order() -> None:
    slots = Slots(1)
    assert slots.take_now() and not slots.take_now()
    order: list[int] = []

    async def request(n: int) -> None:
        await slots.wait()
        order.append(n)

    tasks = [asyncio.ensure_future(request(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []  # all three wait: the one slot is taken
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and slots.free == 0
    slots.release()
    assert slots.free == 1 and slots.take_now()


async def test_a_cancelled_waiter_loses_no_slot() -> None:
    slots = Slots(1)
    assert slots.take_now()
    waiting = asyncio.ensure_future(slots.wait())
    handed = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    waiting.cancel()  # gave up while waiting: its place is dropped
    await asyncio.gather(waiting, return_exceptions=True)
    slots.release()  # handed to `handed`, which is cancelled before it runs: passed on
    handed.cancel()
    await asyncio.gather(handed, return_exceptions=True)
    assert handed.cancelled() and slots.free == 1
    assert slots.take_now() and not slots.take_now()

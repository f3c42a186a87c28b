"""Traffic goes where it is served fastest, and moves when that changes (live sims)."""

from __future__ import annotations

import asyncio
import time

import pytest
from client_fleet import MESSAGES, async_load, fleet, shares, start_sims

from modelfleet.client import AsyncModelServer


@pytest.mark.parametrize("policy", ["peak_ewma", "fastest"])
async def test_a_ten_times_slower_server_gets_little_traffic(start_sim, policy: str) -> None:
    sims = start_sims(start_sim, 3, speed=2)  # replies of ~80 ms: well above jitter
    slow = sims[0]
    slow.fault(slowdown=10)
    async with AsyncModelServer(config=fleet(sims, policy=policy), seed=1) as client:
        await async_load(client, 12, 4)  # warm-up
        counted = shares(await async_load(client, 80, 4))
    assert sum(counted.values()) == 80
    assert counted[slow.address] < 0.15 * 80, counted


async def test_a_four_times_slower_server_of_four_gets_under_two_percent(start_sim) -> None:
    sims = start_sims(start_sim, 4, speed=2)
    slow = sims[0]
    slow.fault(slowdown=4)
    async with AsyncModelServer(config=fleet(sims), seed=2) as client:
        await async_load(client, 24, 12)  # warm-up
        counted = shares(await async_load(client, 300, 12))
    assert counted[slow.address] < 0.02 * 300, counted


async def test_a_slowdown_mid_run_moves_traffic_and_a_reset_wins_it_back(start_sim) -> None:
    sims = start_sims(start_sim, 2, speed=10)
    victim = sims[0]
    async with AsyncModelServer(config=fleet(sims, probe_interval_s=0.2), seed=3) as client:
        # Equal servers measure within some 15 % of each other: at concurrency 8 the in-flight
        # term outweighs that, so both get a share.
        before = shares(await async_load(client, 48, 8))
        assert before[victim.address] >= 4, before  # it had its share before
        await asyncio.to_thread(victim.fault, slowdown=10)  # never block the client's loop
        first_few = shares(await async_load(client, 6, 2))
        after = shares(await async_load(client, 40, 2))
        assert after[victim.address] <= 2, (first_few, after)
        await asyncio.to_thread(victim.fault, reset=True)
        # Its first probe back near its old normal gives it its old rates back, so it wins
        # traffic within about a probe interval (0.2 s; typically 0.3 s here, bound wide).
        won_back, deadline = 0, time.monotonic() + 5
        while won_back < 4 and time.monotonic() < deadline:
            won_back += shares(await async_load(client, 16, 8))[victim.address]
            await asyncio.sleep(0.05)
        assert won_back >= 4, "the server did not win traffic back within 5 s of the reset"


async def test_eight_independent_clients_spread_their_load(start_sim) -> None:
    # A small batch makes requests queue, and the queue (from /metrics) is what the
    # clients share: each sees the others' load there.
    sims = start_sims(start_sim, 3, speed=10, max_batch=4)
    config = fleet(sims, probe_interval_s=0.1)
    clients = [AsyncModelServer(config=config, seed=i) for i in range(8)]
    try:
        await asyncio.gather(*(async_load(c, 4, 2) for c in clients))  # warm-up
        results = await asyncio.gather(*(async_load(c, 40, 3, max_tokens=16) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    counted = shares([o for outcomes in results for o in outcomes])
    assert len(counted) == 3, counted
    assert max(counted.values()) <= 2 * min(counted.values()), counted


async def test_affinity_keeps_a_conversation_on_one_server_until_it_dies(start_sim) -> None:
    sims = start_sims(start_sim, 3, speed=5)  # replies of ~30 ms: above jitter
    async with AsyncModelServer(config=fleet(sims)) as client:
        first = [await client.chat("m", MESSAGES, max_tokens=4, affinity="conv-42")
                 for _ in range(12)]
        pinned = {r.server for r in first}
        assert len(pinned) == 1, pinned
        others = {(await client.chat("m", MESSAGES, max_tokens=4, affinity=f"conv-{i}")).server
                  for i in range(20)}
        assert len(others) > 1, "every key landed on one server: affinity is not per key"
        home = next(s for s in sims if s.address in pinned)
        await asyncio.to_thread(home.kill)
        moved = [await client.chat("m", MESSAGES, max_tokens=4, affinity="conv-42")
                 for _ in range(8)]
    assert all(r.text for r in moved)
    assert {r.server for r in moved}.isdisjoint(pinned)
    assert len({r.server for r in moved[1:]}) == 1  # and it sticks to its new server

"""Server failures never reach the caller while a healthy server remains (live sims)."""

from __future__ import annotations

import asyncio

import pytest
from client_fleet import MESSAGES, MODES, fleet, run_mode, start_sims

from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.errors import NoServerAvailable, RequestRejected, StreamInterrupted


@pytest.mark.parametrize("fault", ["killed", "hang", "error500-half", "error503"])
def test_one_failing_server_costs_the_caller_nothing(start_sim, fault: str) -> None:
    sims = start_sims(start_sim, 3, speed=50)
    bad = sims[0]
    if fault == "hang":
        bad.fault(hang=True)
    elif fault == "error500-half":
        bad.fault(error_rate=0.5, error_status=500)
    elif fault == "error503":
        bad.fault(error_rate=1.0, error_status=503)
    killed = []

    def kill_midway(done: int) -> None:
        if fault == "killed" and not killed and done >= 6:
            killed.append(done)
            bad.kill()

    # A hung server must cost about the stall deadline, not request_timeout_s, whether the
    # answer is asked for whole (max_tokens given) or streamed underneath (no max_tokens).
    config = fleet(sims, stall_timeout_s=1.0, request_timeout_s=60.0)
    runs = [*MODES, ("async", False, None)] if fault == "hang" else MODES
    for mode, stream, *limit in runs:
        max_tokens = limit[0] if limit else 8
        outcomes = run_mode(config, mode, stream, n=30, concurrency=6, on_done=kill_midway,
                            max_tokens=max_tokens)
        assert len(outcomes) == 30 and all(o.text for o in outcomes), (mode, stream, max_tokens)
        slowest = max(o.seconds for o in outcomes)
        assert slowest < 15, f"{mode} stream={stream}: a request took {slowest:.1f}s"
    if fault == "killed":
        assert killed and bad.proc.poll() is not None
    if fault in ("error500-half", "error503"):  # the faulty server was really asked
        assert bad.metric("http_requests_total", {"status": "5xx"}) > 0


async def test_a_bad_request_is_rejected_by_one_server_only(start_sim) -> None:
    sims = start_sims(start_sim, 3, speed=50)
    async with AsyncModelServer(config=fleet(sims)) as client:
        await client.chat("m", MESSAGES, max_tokens=4)
        with pytest.raises(RequestRejected) as caught:
            await client.chat("m", MESSAGES, max_tokens=-5)
    assert caught.value.status == 400 and "max_tokens" in caught.value.message
    rejected = [s.metric("http_requests_total", {"status": "4xx"}) for s in sims]
    assert sorted(rejected) == [0, 0, 1]
    assert caught.value.server == sims[rejected.index(1)].address


async def test_overload_retries_stay_within_the_retry_budget(start_sim) -> None:
    sims = start_sims(start_sim, 3, speed=50)
    for sim in sims:
        sim.fault(error_rate=1.0, error_status=429)
    ratio, reserve_per_s, ttl_s = 0.2, 0.5, 10.0  # RetryBudget keeps ttl_s = 10 s of history
    config = fleet(sims, max_retry=5, retry_budget_ratio=ratio,
                   retry_budget_min_per_s=reserve_per_s)

    def attempts_so_far() -> float:
        return sum(s.metric("http_requests_total", {"status": "4xx"}) for s in sims)

    n = 40
    async with AsyncModelServer(config=config) as client:
        with pytest.raises(NoServerAvailable):
            await client.chat("m", MESSAGES, max_tokens=4)  # first use: probes come first
        before = attempts_so_far()
        for _ in range(n):
            with pytest.raises(NoServerAvailable) as caught:
                await client.chat("m", MESSAGES, max_tokens=4)
        attempts = attempts_so_far() - before
    assert set(caught.value.reasons) == {s.address for s in sims}
    # Without a budget: n x max_retry = 200. With it: each request once, plus the
    # ratio of all requests, plus the reserve.
    assert n <= attempts <= n + ratio * (n + 1) + reserve_per_s * ttl_s + 1, attempts


def test_all_servers_down_names_each_one(start_sim) -> None:
    sims = start_sims(start_sim, 3, speed=50)
    for sim in sims:
        sim.kill()
    for mode, stream in MODES:
        with pytest.raises(NoServerAvailable) as caught:
            run_mode(fleet(sims), mode, stream, n=1, concurrency=1)
        assert set(caught.value.reasons) == {s.address for s in sims}, (mode, stream)
        assert all(caught.value.reasons.values())
        for sim in sims:
            assert sim.address in str(caught.value)


async def test_a_stream_broken_after_its_first_token_raises_stream_interrupted(start_sim) -> None:
    sim = start_sim(speed=50)
    sim.fault(disconnect_after_tokens=3)
    got: list[str] = []
    async with AsyncModelServer(config=fleet([sim])) as client:
        with pytest.raises(StreamInterrupted) as caught:
            async for piece in client.chat_stream("m", MESSAGES, max_tokens=20,
                                                  continue_stream=False):
                got.append(piece)
    assert len(got) == 3
    assert caught.value.text_so_far == "".join(got) and caught.value.server == sim.address


def test_sync_stream_broken_after_first_token(start_sim) -> None:
    sim = start_sim(speed=50)
    sim.fault(stall_after_tokens=2)
    got: list[str] = []
    with ModelServer(config=fleet([sim], stall_timeout_s=0.5)) as client:
        with pytest.raises(StreamInterrupted) as caught:
            for piece in client.chat_stream("m", MESSAGES, max_tokens=20, continue_stream=False):
                got.append(piece)
    assert len(got) == 2 and caught.value.text_so_far == "".join(got)


async def test_a_server_that_breaks_replies_is_retried_before_the_first_token(start_sim) -> None:
    broken, good = start_sim(speed=50), start_sim(speed=50)
    broken.fault(error_rate=1.0, error_status=500)
    async with AsyncModelServer(config=fleet([broken, good])) as client:
        for _ in range(10):
            text = "".join([p async for p in client.chat_stream("m", MESSAGES, max_tokens=5)])
            assert text
        result = await client.chat("m", MESSAGES, max_tokens=5)
    assert result.server == good.address


async def test_a_cancelled_request_frees_its_slot_and_its_server(start_sim) -> None:
    sim = start_sim(speed=10)
    async with AsyncModelServer(config=fleet([sim])) as client:
        await client.chat("m", MESSAGES, max_tokens=2)
        task = asyncio.ensure_future(client.chat("m", MESSAGES, max_tokens=2000))

        while await asyncio.to_thread(sim.metric, "vllm:num_requests_running") < 1:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if await asyncio.to_thread(sim.metric, "vllm:num_requests_running") == 0:
                break
            await asyncio.sleep(0.02)
        assert sim.metric("vllm:num_requests_running") == 0
        status = await client.status()
        assert status["m"].servers[0].in_flight == 0

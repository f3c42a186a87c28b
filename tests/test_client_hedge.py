"""Hedged requests (routing.hedge_after), against in-process servers (the mock transport).

A server's behaviour is an async function of the request: it may wait before answering
(a stalled first token) and notes when the client cancelled it (the loser of a race).
Routing is round robin, so the first request goes to the first server. Delays are far
apart (a hedge after 0.05 s against a stall of seconds), and the one timed assertion is a
wide bound. End to end against real sims: test_sim_stall.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from modelfleet._transports.mock import MockRequest, MockResponse, MockTransport
from modelfleet.client import AsyncModelServer
from modelfleet.config import BenchmarkSpec, FleetConfig, ModelSpec, RoutingSpec, ServerSpec
from modelfleet.errors import NoServerAvailable, RequestRejected
from modelfleet.routing import FirstTokenTimes, HedgeBudget, hedge_delay
from modelfleet.routing.hedging import FLOOR_S, MIN_SAMPLES

USER = [{"role": "user", "content": "hello there"}]
ANSWER = "General Kenobi, you are a bold one"
A, B, C = "a:1", "b:1", "c:1"
LONG_S = 30.0  # a stall no test waits out: the race must cancel it

Behaviour = Callable[[MockRequest, int], Awaitable[MockResponse]]


def after(seconds: float, then: str = "ok") -> Behaviour:
    async def answer(request: MockRequest, n: int) -> MockResponse:
        await asyncio.sleep(seconds)
        if then == "refused":
            raise ConnectionRefusedError(111, "Connection refused")
        if then == "400":
            return MockResponse.error(400, "bad request")
        return MockResponse.answer(request, ANSWER)
    return answer


ok = after(0.0)


def first(times: int, then: Behaviour) -> Behaviour:
    async def answer(request: MockRequest, n: int) -> MockResponse:
        return await (ok if n < times else then)(request, n)
    return answer


class Fleet:
    """A chat model "m" whose servers answer as their behaviours say, hedging as asked."""

    def __init__(self, behaviours: dict[str, Behaviour], **routing: object) -> None:
        self.behaviours = behaviours
        self.calls: list[str] = []
        self.streamed: list[bool] = []  # per call: asked for as a stream
        self.cancelled: list[str] = []  # calls the client gave up on before they answered
        self.transport = MockTransport(self.handle)
        self._probe = [dict(m) for m in BenchmarkSpec().messages]
        settings = {"policy": "round_robin", "probe_interval_s": 3600.0, "stall_timeout_s": 60.0,
                    "request_timeout_s": 120.0, **routing}
        servers = tuple(ServerSpec(a.split(":")[0], int(a.split(":")[1])) for a in behaviours)
        self.config = FleetConfig(models={"m": ModelSpec(name="m", servers=servers)},
                                  routing=RoutingSpec(**settings))  # type: ignore[arg-type]

    async def handle(self, request: MockRequest) -> MockResponse:
        if request.method == "GET":
            return MockResponse(status=404, text="no such page")
        if (request.json or {}).get("messages") == self._probe:
            return MockResponse.answer(request, "OK")  # the background benchmark
        before = self.calls.count(request.server)
        self.calls.append(request.server)
        self.streamed.append(request.stream)
        try:
            return await self.behaviours[request.server](request, before)
        except asyncio.CancelledError:
            self.cancelled.append(request.server)
            raise

    def client(self, registry: CollectorRegistry | None = None) -> AsyncModelServer:
        return AsyncModelServer(config=self.config, transport=self.transport, metrics=registry)


async def hedges(client: AsyncModelServer) -> dict[str, int]:
    return dict((await client.status())["m"].hedges)


async def nothing_left_open(client: AsyncModelServer, fleet: Fleet) -> None:
    servers = (await client.status())["m"].servers
    assert [s.in_flight for s in servers] == [0] * len(servers)
    assert fleet.transport.open_bodies == 0


async def read(stream: object) -> str:
    return "".join([piece async for piece in stream])  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["stream", "whole", "streamed-underneath"])
async def test_a_stalled_first_token_is_hedged_and_the_loser_cancelled(how: str) -> None:
    fleet = Fleet({A: after(LONG_S), B: ok}, hedge_after=0.05)
    async with fleet.client() as client:
        started = asyncio.get_running_loop().time()
        if how == "stream":
            stream = client.chat_stream("m", USER)
            text, server = await read(stream), stream.server
        else:
            params = {"max_tokens": 16} if how == "whole" else {}
            result = await client.chat("m", USER, **params)
            text, server = result.text, result.server
        assert (text, server) == (ANSWER, B)
        assert asyncio.get_running_loop().time() - started < LONG_S / 3
        assert fleet.calls == [A, B] and fleet.cancelled == [A]
        assert all(fleet.streamed), "a hedged whole answer is streamed underneath"
        assert await hedges(client) == {"sent": 1, "won": 1, "lost": 0, "denied_by_budget": 0}
        await nothing_left_open(client, fleet)


async def test_the_first_server_keeps_the_request_when_its_token_comes_first() -> None:
    fleet = Fleet({A: after(0.3), B: after(LONG_S)}, hedge_after=0.05)
    async with fleet.client() as client:
        result = await client.chat("m", USER, max_tokens=16)
        assert result.server == A and fleet.calls == [A, B] and fleet.cancelled == [B]
        assert await hedges(client) == {"sent": 1, "won": 0, "lost": 1, "denied_by_budget": 0}
        await nothing_left_open(client, fleet)


async def test_no_hedge_when_the_first_token_comes_in_time() -> None:
    fleet = Fleet({A: ok, B: ok}, hedge_after=5.0)
    async with fleet.client() as client:
        for _ in range(4):
            await client.chat("m", USER)
        assert fleet.calls == [A, B, A, B] and fleet.cancelled == []
        assert (await hedges(client))["sent"] == 0


async def test_off_means_off() -> None:
    fleet = Fleet({A: after(0.3), B: ok})  # hedge_after defaults to off
    async with fleet.client() as client:
        result = await client.chat("m", USER, max_tokens=16)
        assert result.server == A and fleet.calls == [A]
        assert fleet.streamed == [False], "without hedging a bounded answer comes in one piece"
        assert await hedges(client) == {}
        assert client._route("m").hedging is None


async def test_a_spent_budget_sends_no_copy_and_says_so() -> None:
    fleet = Fleet({A: after(0.3), B: ok}, hedge_after=0.05, hedge_budget=0.0)
    async with fleet.client() as client:
        await client.warm()
        route = client._route("m")
        assert route.hedging is not None
        route.hedging.budget = HedgeBudget(0.0, min_per_s=0.0)  # no reserve either
        result = await client.chat("m", USER)
        assert result.server == A and fleet.calls == [A]
        assert await hedges(client) == {"sent": 0, "won": 0, "lost": 0, "denied_by_budget": 1}


async def test_a_failed_first_copy_lets_the_hedge_win() -> None:
    fleet = Fleet({A: after(0.15, "refused"), B: after(0.3)}, hedge_after=0.05)
    async with fleet.client() as client:
        result = await client.chat("m", USER)
        assert result.server == B and fleet.calls == [A, B] and fleet.cancelled == []
        assert (await hedges(client))["won"] == 1
        await nothing_left_open(client, fleet)


async def test_both_copies_failing_count_as_two_servers_tried() -> None:
    fleet = Fleet({A: after(0.1, "refused"), B: after(0.0, "refused")}, hedge_after=0.05,
                  max_retry=2)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable) as caught:
            await client.chat("m", USER)
        assert fleet.calls == [A, B]
        assert all("refused" in why for why in caught.value.reasons.values())
        assert set(caught.value.reasons) == {A, B}
        await nothing_left_open(client, fleet)


async def test_the_requests_own_error_ends_the_race() -> None:
    fleet = Fleet({A: after(0.15, "400"), B: after(LONG_S)}, hedge_after=0.05)
    async with fleet.client() as client:
        with pytest.raises(RequestRejected):
            await client.chat("m", USER)
        assert fleet.cancelled == [B]
        await nothing_left_open(client, fleet)


async def test_auto_learns_each_servers_first_token_time_then_hedges() -> None:
    fleet = Fleet({A: first(MIN_SAMPLES, after(LONG_S)), B: ok}, hedge_after="auto")
    async with fleet.client() as client:
        for _ in range(2 * MIN_SAMPLES):  # nothing learnt yet: no hedge, whatever happens
            await client.chat("m", USER)
        assert (await hedges(client))["sent"] == 0
        result = await client.chat("m", USER)  # A stalls now: hedged after its p95
        assert result.server == B and fleet.cancelled == [A]
        assert (await hedges(client))["won"] == 1


async def test_hedges_are_counted_in_metrics() -> None:
    registry = CollectorRegistry()
    fleet = Fleet({A: after(LONG_S), B: ok}, hedge_after=0.05)
    async with fleet.client(registry) as client:
        await client.chat("m", USER)
    for outcome, value in (("sent", 1.0), ("won", 1.0), ("lost", 0.0)):
        assert registry.get_sample_value("modelfleet_hedges_total",
                                         {"model": "m", "outcome": outcome}) == value
    assert registry.get_sample_value("modelfleet_requests_total",
                                     {"model": "m", "server": B, "outcome": "ok"}) == 1.0


def test_the_delay_is_the_setting_or_the_learnt_p95_above_a_floor() -> None:
    times = FirstTokenTimes()
    assert hedge_delay("off", times) is None and hedge_delay(0.3, None) == 0.3
    assert hedge_delay("auto", times) is None  # nothing learnt
    for i in range(100):
        times.observe(0.001 * (i + 1))  # 1..100 ms
    assert hedge_delay("auto", times) == pytest.approx(0.096)
    fast = FirstTokenTimes()
    for _ in range(MIN_SAMPLES):
        fast.observe(0.0001)
    assert hedge_delay("auto", fast) == FLOOR_S
    stuck = FirstTokenTimes()  # 92 % answer in 50 ms, 8 % are stuck for a second
    for i in range(100):
        stuck.observe(1.0 if i % 12 == 0 else 0.05)
    assert stuck.quantile(0.95) == 1.0 and hedge_delay("auto", stuck) == 0.1  # 2 x the p90


def test_the_hedge_budget_is_a_fraction_of_requests_plus_a_reserve() -> None:
    now = [0.0]
    budget = HedgeBudget(0.05, min_per_s=0.0, clock=lambda: now[0])
    for _ in range(100):
        budget.deposit()
    assert [budget.try_withdraw() for _ in range(6)] == [True] * 5 + [False]
    now[0] = 11.0  # the requests aged out
    assert not budget.try_withdraw()


async def test_the_gateways_relayed_streams_are_hedged_too() -> None:
    fleet = Fleet({A: after(LONG_S), B: ok}, hedge_after=0.05)
    async with fleet.client() as client:
        stream = await client.relay("/v1/chat/completions",
                                    {"model": "m", "messages": USER, "stream": True})
        body = b"".join([chunk async for chunk in stream])  # type: ignore[union-attr]
        assert stream.server == B and b"Kenobi" in body and fleet.cancelled == [A]
        await nothing_left_open(client, fleet)


async def test_a_server_that_stalls_every_request_is_marked_down_not_hidden() -> None:
    # Hedging answers around a server that never shows a first token; without this rule
    # it would never time out (its copies are cancelled), so it would keep every first try.
    fleet = Fleet({A: after(LONG_S), B: ok}, hedge_after=0.05)
    async with fleet.client() as client:
        async def a_status() -> object:
            return next(s for s in (await client.status())["m"].servers if s.address == A)

        for _ in range(12):  # A is the first try of every other request, until it is down
            assert (await client.chat("m", USER)).server == B
            if (await a_status()).health == "down":
                break
        a = await a_status()
        assert a.health == "down" and "in a row" in (a.reason or ""), a
        assert fleet.cancelled.count(A) == 3  # the third silent loss in a row did it
        calls = len(fleet.calls)
        for _ in range(3):
            assert (await client.chat("m", USER)).server == B
        assert fleet.calls[calls:] == [B, B, B]  # no first try on A, no hedge needed
        await nothing_left_open(client, fleet)

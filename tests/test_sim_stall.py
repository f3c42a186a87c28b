"""The sim's stall fault, its 499 count of requests whose client left, and hedging against
both on real sims (the race itself is tested on the mock transport: test_client_hedge.py)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

from client_fleet import MESSAGES, fleet, start_sims
from helpers import http_json

from modelfleet.client import AsyncModelServer

CHAT = [{"role": "user", "content": "Say OK."}]
CALLS = "/v1/chat/completions"


def first_token_s(sim, *, stream: bool = True, max_tokens: int = 8) -> tuple[float, float]:
    """(seconds to the response headers, seconds to the first token) of one raw request."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=20)
    try:
        started = time.monotonic()
        body = {"model": "m", "messages": CHAT, "max_tokens": max_tokens, "stream": stream}
        conn.request("POST", CALLS, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        headers = time.monotonic() - started
        assert response.status == 200
        if not stream:
            assert json.loads(response.read())["choices"][0]["message"]["content"]
            return headers, time.monotonic() - started
        while True:
            line = response.readline()
            assert line, "the stream ended with no token"
            if line.startswith(b"data: {") and b'"content":"' in line.replace(b" ", b"") \
                    and b'"content":""' not in line.replace(b" ", b""):
                took = time.monotonic() - started
                response.read()  # the rest, to its end
                return headers, took
    finally:
        conn.close()


def test_a_stalled_request_goes_silent_before_its_first_token_then_on(start_sim) -> None:
    sim = start_sim(speed=200)
    assert first_token_s(sim)[1] < 0.5
    state = sim.fault(stall_fraction=1.0, stall_s=1.0)
    assert (state["stall_fraction"], state["stall_s"]) == (1.0, 1.0)
    headers, first = first_token_s(sim)
    assert headers < 0.5 <= 0.9 <= first  # the headers at once, the first token a second later
    assert first_token_s(sim, stream=False)[1] >= 0.9  # a whole answer waits the same
    sim.fault(stall_fraction=0.5, stall_s=0.5)
    times = [first_token_s(sim)[1] for _ in range(24)]
    stalled = sum(t >= 0.45 for t in times)
    assert 3 <= stalled <= 21, times  # some, not all
    sim.fault(reset=True)
    assert first_token_s(sim)[1] < 0.5


def test_bad_stall_faults_are_refused(start_sim) -> None:
    sim = start_sim(speed=200)
    for bad in ({"stall_fraction": 1.5}, {"stall_fraction": "half"}, {"stall_s": -1}):
        status, body = http_json(f"{sim.url}/sim/fault", bad)
        assert status == 400 and next(iter(bad)) in json.dumps(body), body
    assert http_json(f"{sim.url}/sim/fault", {})[1]["stall_fraction"] == 0.0


def test_a_request_whose_client_left_counts_as_499(start_sim) -> None:
    sim = start_sim(speed=200)
    left = {"handler": CALLS, "status": "499"}
    assert sim.metric("http_requests_total", left) == 0
    sim.fault(stall_fraction=1.0, stall_s=30)
    for stream in (True, False):
        conn = http.client.HTTPConnection(sim.host, sim.port, timeout=20)
        body = {"model": "m", "messages": CHAT, "max_tokens": 8, "stream": stream}
        conn.request("POST", CALLS, json.dumps(body), {"Content-Type": "application/json"})
        if stream:
            assert conn.getresponse().status == 200  # headers, then the stall
        else:
            time.sleep(0.2)  # (nothing to wait on: a whole answer sends nothing while stalled)
        conn.close()
    deadline = time.monotonic() + 10
    while sim.metric("http_requests_total", left) < 2:
        assert time.monotonic() < deadline, sim.metrics()
        time.sleep(0.05)
    assert sim.metric("http_requests_total", {"handler": CALLS, "status": "2xx"}) == 0


def test_hedging_answers_around_a_server_that_stalls_every_request(start_sim) -> None:
    stalled, normal = start_sims(start_sim, 2, speed=50)
    stalled.fault(stall_fraction=1.0, stall_s=2.0)
    config = fleet([stalled, normal], hedge_after=0.2, policy="round_robin")

    async def run() -> tuple[list[float], dict[str, int]]:
        took = []
        async with AsyncModelServer(config=config) as client:
            await client.warm()  # (its probe of the stalled server stalls too)
            for i in range(8):
                started = time.monotonic()
                if i % 2:
                    stream = client.chat_stream("m", MESSAGES, max_tokens=8)
                    text = "".join([piece async for piece in stream])
                else:
                    text = (await client.chat("m", MESSAGES, max_tokens=8)).text
                assert text
                took.append(time.monotonic() - started)
            return took, dict((await client.status())["m"].hedges)

    took, hedges = asyncio.run(run())
    assert max(took) < 1.5, took  # never the stalled server's 2 s
    assert hedges["sent"] >= 1 and hedges["won"] == hedges["sent"]
    left = stalled.metric("http_requests_total", {"handler": CALLS, "status": "499"})
    deadline = time.monotonic() + 10
    while left < hedges["sent"] and time.monotonic() < deadline:  # each loser, once it noticed
        time.sleep(0.05)
        left = stalled.metric("http_requests_total", {"handler": CALLS, "status": "499"})
    assert left == hedges["sent"]

"""The retry loop's branches, against in-process servers (the mock transport): milliseconds each.

Every server is a function of the request (and of how often it was asked before); the
client's background probes are answered apart and never counted, so `fleet.calls` is
exactly the servers a caller's request was tried on, in order. Routing is round robin,
so which server comes next is known. The end-to-end behaviour against real sims is in
test_client_api.py and test_client_failures.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import pytest

from modelfleet._exceptions import EngineFailure, engine_failure, map_exceptions
from modelfleet._transports.mock import MockRequest, MockResponse, MockTransport
from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.client.retry import RetryState
from modelfleet.config import BenchmarkSpec, FleetConfig, ModelSpec, RoutingSpec, ServerSpec
from modelfleet.errors import NoServerAvailable, RequestRejected, StreamInterrupted
from modelfleet.routing import Failure

USER = [{"role": "user", "content": "hello there"}]
ANSWER = "General Kenobi, you are a bold one"
A, B, C = "a:1", "b:1", "c:1"

Behaviour = Callable[[MockRequest, int], MockResponse]  # (request, times asked before)


def ok(request: MockRequest, n: int) -> MockResponse:
    if request.path == "/v1/embeddings":
        return MockResponse.embeddings(request)
    return MockResponse.answer(request, ANSWER)


def refused(request: MockRequest, n: int) -> MockResponse:
    raise ConnectionRefusedError(111, "Connection refused")


def status(code: int, retry_after: str | None = None) -> Behaviour:
    def answer(request: MockRequest, n: int) -> MockResponse:
        return MockResponse.error(code, f"status {code} from {request.server}",
                                  retry_after=retry_after)
    return answer


def first(times: int, bad: Behaviour, then: Behaviour = ok) -> Behaviour:
    return lambda request, n: bad(request, n) if n < times else then(request, n)


class Fleet:
    """A model "m" whose servers answer as their behaviours say."""

    def __init__(self, behaviours: dict[str, Behaviour], *, kind: str = "chat",
                 **routing: object) -> None:
        self.behaviours = behaviours
        self.calls: list[str] = []
        self.probes: dict[str, Behaviour] = {}  # how a server answers the benchmark (default: ok)
        self.transport = MockTransport(self.handle)
        benchmark = BenchmarkSpec()
        self._probe_messages = [dict(m) for m in benchmark.messages]
        self._probe_input = [benchmark.embedding_input]
        settings = {"policy": "round_robin", "probe_interval_s": 3600.0,
                    "stall_timeout_s": 0.2, **routing}
        servers = tuple(ServerSpec(address.split(":")[0], int(address.split(":")[1]))
                        for address in behaviours)
        self.config = FleetConfig(models={"m": ModelSpec(name="m", servers=servers, kind=kind)},
                                  routing=RoutingSpec(**settings))  # type: ignore[arg-type]

    def handle(self, request: MockRequest) -> MockResponse:
        body = request.json or {}
        if request.method == "GET":
            return MockResponse(status=404, text="no such page")
        if body.get("messages") == self._probe_messages or body.get("input") == self._probe_input:
            # the client's background benchmark: not a caller's request
            return self.probes.get(request.server, ok)(request, 0)
        before = self.calls.count(request.server)
        self.calls.append(request.server)
        return self.behaviours[request.server](request, before)

    def client(self) -> AsyncModelServer:
        return AsyncModelServer(config=self.config, transport=self.transport)


async def nothing_left_open(client: AsyncModelServer, fleet: Fleet) -> None:
    """Every lease ended and every body was read or closed, whatever path was taken."""
    servers = (await client.status())["m"].servers
    assert [s.in_flight for s in servers] == [0] * len(servers)
    assert fleet.transport.open_bodies == 0


# --------------------------------------------------------------------------- the retry loop


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "streamed-underneath"])
async def test_a_refused_server_costs_the_caller_nothing(whole: bool) -> None:
    fleet = Fleet({A: refused, B: ok})
    params = {"max_tokens": 16} if whole else {}
    async with fleet.client() as client:
        result = await client.chat("m", USER, **params)
        assert (result.text, result.server) == (ANSWER, B)
        assert fleet.calls == [A, B]
        again = await client.chat("m", USER, **params)  # A is down now: not tried again
        assert again.server == B and fleet.calls == [A, B, B]
        down = next(s for s in (await client.status())["m"].servers if s.address == A)
        assert down.health.value == "down" and "Connection refused" in (down.reason or "")
        await nothing_left_open(client, fleet)


async def test_a_4xx_is_raised_after_one_attempt_and_blames_no_server() -> None:
    fleet = Fleet({A: status(400), B: ok})
    async with fleet.client() as client:
        with pytest.raises(RequestRejected) as caught:
            await client.chat("m", USER, max_tokens=8)
        assert fleet.calls == [A]
        assert (caught.value.status, caught.value.server) == (400, A)
        assert "status 400 from a:1" in caught.value.message
        health = {s.address: (s.health.value, s.failures)
                  for s in (await client.status())["m"].servers}
        assert health[A] == ("up", 0)
        await nothing_left_open(client, fleet)


@pytest.mark.parametrize("code", [429, 503])
async def test_backpressure_moves_on_and_honours_retry_after(code: int) -> None:
    # Retry-After 0: the busy server may take the very next request; 60: it is left alone.
    for retry_after, busy_again in (("0", True), ("60", False)):
        fleet = Fleet({A: first(1, status(code, retry_after)), B: ok})
        async with fleet.client() as client:
            result = await client.chat("m", USER, max_tokens=8)
            assert result.server == B and fleet.calls == [A, B]
            later = [(await client.chat("m", USER, max_tokens=8)).server for _ in range(4)]
            assert (A in later) is busy_again, (retry_after, later)
            servers = {s.address: s for s in (await client.status())["m"].servers}
            assert servers[A].health.value == "up"  # busy is not sick
            if not busy_again:
                assert f"HTTP {code}" in (servers[A].reason or "")
            await nothing_left_open(client, fleet)


async def test_retry_budget_spent_stops_retrying_and_says_so() -> None:
    fleet = Fleet({A: status(500), B: ok}, retry_budget_ratio=0.0, retry_budget_min_per_s=0.0)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable) as caught:
            await client.chat("m", USER, max_tokens=8)
        assert fleet.calls == [A]
        assert caught.value.reasons[A].startswith("HTTP 500")
        assert caught.value.reasons[B] == "not tried: the retry budget is spent"
        await nothing_left_open(client, fleet)


async def test_max_retry_reached_leaves_the_rest_untried() -> None:
    fleet = Fleet({A: status(500), B: status(500), C: status(500)}, max_retry=2)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable) as caught:
            await client.chat("m", USER, max_tokens=8)
        assert len(fleet.calls) == 2 and len(set(fleet.calls)) == 2
        untried = ({A, B, C} - set(fleet.calls)).pop()
        assert caught.value.reasons[untried] == "not tried: max_retry (2) was reached"
        assert all(caught.value.reasons[s].startswith("HTTP 500") for s in fleet.calls)
        assert "HTTP 500" in str(caught.value) and untried in str(caught.value)
        await nothing_left_open(client, fleet)


async def test_once_every_server_was_tried_they_are_tried_again() -> None:
    fleet = Fleet({A: first(1, status(500)), B: first(1, status(502))}, max_retry=3)
    async with fleet.client() as client:
        result = await client.chat("m", USER, max_tokens=8)
        assert fleet.calls[:2] == [A, B] and len(fleet.calls) == 3
        assert result.server == fleet.calls[2] and result.text == ANSWER
        await nothing_left_open(client, fleet)


async def test_every_server_failing_every_time_says_what_each_did() -> None:
    fleet = Fleet({A: refused, B: status(500)}, max_retry=4)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable) as caught:
            await client.chat("m", USER, max_tokens=8)
        assert len(fleet.calls) == 4 and set(fleet.calls) == {A, B}
        reasons = caught.value.reasons
        assert set(reasons) == {A, B}
        assert "Connection refused" in reasons[A] and reasons[B].startswith("HTTP 500")
        assert "attempts)" in reasons[A] + reasons[B]  # a server tried twice says so
        await nothing_left_open(client, fleet)


async def test_a_silent_server_is_left_at_the_stall_deadline() -> None:
    async def silent(request: MockRequest, n: int) -> MockResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fleet = Fleet({A: silent, B: ok})  # type: ignore[dict-item]  # stall_timeout_s is 0.2
    async with fleet.client() as client:
        result = await client.chat("m", USER)
        assert result.server == B and fleet.calls == [A, B]
        reason = next(s.reason for s in (await client.status())["m"].servers if s.address == A)
        assert "stall deadline" in (reason or "")
        await nothing_left_open(client, fleet)


# --------------------------------------------------------------------------- streams, embeddings


def broken(after: int, by: BaseException | None = None) -> Behaviour:
    return lambda request, n: MockResponse.answer(request, ANSWER, break_after=after,
                                                  broken_by=by)


async def test_a_stream_moves_before_its_first_token_and_not_after() -> None:
    fleet = Fleet({A: broken(0, ConnectionResetError(104, "Connection reset by peer")), B: ok})
    async with fleet.client() as client:
        stream = client.chat_stream("m", USER)
        assert "".join([piece async for piece in stream]) == ANSWER
        assert stream.server == B and fleet.calls == [A, B] and stream.finish_reason == "stop"

        fleet.behaviours[B] = broken(2, ConnectionResetError(104, "Connection reset by peer"))
        stream = client.chat_stream("m", USER, continue_stream=False)  # (on: test_continuation)
        with pytest.raises(StreamInterrupted) as caught:
            async for _ in stream:
                pass
        assert caught.value.server == B and caught.value.text_so_far == "General Kenobi,"
        assert fleet.calls[-1] == B  # not moved: the caller already has text from B
        await nothing_left_open(client, fleet)


async def test_leaving_a_stream_early_closes_it_and_ends_its_lease() -> None:
    fleet = Fleet({A: ok})
    async with fleet.client() as client:
        async with client.chat_stream("m", USER) as stream:
            async for _ in stream:
                assert fleet.transport.open_bodies == 1
                break
        await nothing_left_open(client, fleet)


async def test_embeddings_fail_over_batch_by_batch() -> None:
    fleet = Fleet({A: first(1, status(503)), B: ok}, kind="embedding")
    async with fleet.client() as client:
        result = await client.embed_result("m", ["one", "two", "three"])
        assert result.vectors == [[0.0] * 4, [1.0] * 4, [2.0] * 4]
        assert result.servers == (B,) and fleet.calls == [A, B]
        await nothing_left_open(client, fleet)


def test_the_sync_client_runs_the_same_loop_over_the_same_transport() -> None:
    fleet = Fleet({A: refused, B: ok})
    with ModelServer(config=fleet.config, transport=fleet.transport) as client:
        assert client.chat("m", USER, max_tokens=8).server == B
        assert "".join(client.chat_stream("m", USER)) == ANSWER
    assert fleet.calls == [A, B, B]


# --------------------------------------------------------------------------- bad answers
# (the same against real sockets, one hostile server per misbehaviour: test_hostile_servers.py)


def answering(body: object) -> Behaviour:
    return lambda request, n: MockResponse(json=body)


def streaming(*events: object) -> Behaviour:
    return lambda request, n: MockResponse(chunks=[
        b"data: " + json.dumps(event).encode() + b"\n\n" for event in events])


def choice(**fields: object) -> dict[str, object]:
    return {"choices": [{"index": 0, "finish_reason": "stop", **fields}], "model": "m"}


MALFORMED = {
    "not an object": [1, 2, 3],
    "no choices": {"model": "m", "usage": {"completion_tokens": 3}},
    "empty choices": {"choices": [], "model": "m"},
    "choices a string": {"choices": "hello", "model": "m"},
    "a choice of null": {"choices": [None], "model": "m"},
    "content a number": choice(message={"role": "assistant", "content": 42}),
    "usage a string": {**choice(message={"content": ANSWER}), "usage": "lots"},
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=list(MALFORMED))
async def test_a_malformed_answer_is_that_servers_error_never_the_callers(body: object) -> None:
    fleet = Fleet({A: answering(body), B: ok})
    async with fleet.client() as client:
        result = await client.chat("m", USER, max_tokens=8)
        assert (result.text, result.server) == (ANSWER, B) and fleet.calls == [A, B]
        servers = {s.address: s for s in (await client.status())["m"].servers}
        assert (servers[A].failures, servers[B].failures) == (1, 0)  # counted like a 5xx
        await nothing_left_open(client, fleet)
    fleet = Fleet({A: answering(body)}, max_retry=1)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable) as caught:
            await client.chat("m", USER, max_tokens=8)
        assert caught.value.reasons[A].startswith("malformed answer: ")
        await nothing_left_open(client, fleet)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "streamed"])
async def test_an_error_object_under_200_moves_on_whatever_code_it_names(whole: bool) -> None:
    error = {"error": {"message": "CUDA out of memory", "type": "BadRequestError", "code": 400}}
    bad = answering(error) if whole else streaming(error)
    params = {"max_tokens": 8} if whole else {}
    fleet = Fleet({A: bad, B: ok})
    async with fleet.client() as client:  # not RequestRejected: the request was accepted
        assert (await client.chat("m", USER, **params)).server == B
        assert fleet.calls == [A, B]
        await nothing_left_open(client, fleet)
    fleet = Fleet({A: bad}, max_retry=1)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable, match="CUDA out of memory"):
            await client.chat("m", USER, **params)


@pytest.mark.parametrize("chunks", [[b"data: [1, 2]\n\n", b"data: [DONE]\n\n"],
                                    [b"data: [DONE]\n\n"], [b": comment only\n\n"]],
                         ids=["events-not-objects", "bare-done", "no-event"])
async def test_a_stream_with_no_answer_in_it_is_no_answer(chunks: list[bytes]) -> None:
    fleet = Fleet({A: lambda request, n: MockResponse(chunks=chunks), B: ok})
    async with fleet.client() as client:
        stream = client.chat_stream("m", USER)
        assert "".join([piece async for piece in stream]) == ANSWER
        assert stream.server == B and fleet.calls == [A, B]
        await nothing_left_open(client, fleet)


async def test_a_bad_chunk_after_the_first_token_interrupts_the_stream() -> None:
    token = {"choices": [{"index": 0, "delta": {"content": "General"}, "finish_reason": None}]}
    bad = {"choices": [{"index": 0, "delta": {"content": 42}, "finish_reason": None}]}
    fleet = Fleet({A: streaming(token, bad), B: ok})
    async with fleet.client() as client:
        stream = client.chat_stream("m", USER, continue_stream=False)
        with pytest.raises(StreamInterrupted, match="the text is a number") as caught:
            async for _ in stream:
                pass
        assert (caught.value.server, caught.value.text_so_far) == (A, "General")
        await nothing_left_open(client, fleet)


async def test_a_redirect_is_not_followed_and_is_that_servers_failure() -> None:
    def redirect(request: MockRequest, n: int) -> MockResponse:
        return MockResponse(status=307, text="", headers={"Location": "http://x:1/v1/chat"})

    fleet = Fleet({A: redirect, B: ok})
    async with fleet.client() as client:
        assert (await client.chat("m", USER, max_tokens=8)).server == B
        down = next(s for s in (await client.status())["m"].servers if s.address == A)
        assert down.health.value == "down" and "redirect" in (down.reason or "")


@pytest.mark.parametrize(("vectors", "words"), [
    ([[1.0, 2.0]] * 2, "2 embeddings for 3 inputs"),
    ([[1.0, 2.0], [1.0], [1.0, 2.0]], "unequal"),
    (["%% not base64 %%"] * 3, "does not decode"),
])
async def test_embeddings_not_one_vector_per_input_move_on(vectors: list[object],
                                                           words: str) -> None:
    def bad(request: MockRequest, n: int) -> MockResponse:
        return MockResponse(json={"data": [{"index": i, "embedding": v}
                                           for i, v in enumerate(vectors)]})

    fleet = Fleet({A: bad, B: ok}, kind="embedding")
    async with fleet.client() as client:
        result = await client.embed_result("m", ["one", "two", "three"])
        assert result.servers == (B,) and len(result.vectors) == 3 and fleet.calls == [A, B]
    fleet = Fleet({A: bad}, kind="embedding", max_retry=1)
    async with fleet.client() as client:
        with pytest.raises(NoServerAvailable, match=words):
            await client.embed("m", ["one", "two", "three"])


async def test_a_probe_survives_an_answer_nobody_foresaw(
        caplog: pytest.LogCaptureFixture) -> None:
    def unforeseen(request: MockRequest, n: int) -> MockResponse:
        raise RuntimeError("the transport itself tripped")  # not a network error: unmapped

    fleet = Fleet({A: ok, B: ok})
    fleet.probes[A] = unforeseen
    async with fleet.client() as client:
        latency = await client.get_all_latency()  # probes the caller waits for: no raise
        assert latency["m"][B] is not None
        servers = {s.address: s for s in (await client.status())["m"].servers}
        assert servers[A].failures >= 1 and servers[B].failures == 0
    said = [r for r in caplog.records if "the transport itself tripped" in r.getMessage()]
    assert said and all(r.exc_info is None and r.levelname == "WARNING" for r in said)


# --------------------------------------------------------------------------- relayed streams


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def opening_with_an_error(request: MockRequest, n: int) -> MockResponse:
    """A fast engine's opening, in one read: a first event, then an error event."""
    piece = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    error = {"error": {"message": "the engine failed", "code": 500}}
    return MockResponse(chunks=[sse(piece) + sse(error) + sse(piece)])


async def test_a_relayed_stream_moves_on_for_an_error_anywhere_in_its_opening() -> None:
    fleet = Fleet({A: opening_with_an_error, B: ok})
    async with fleet.client() as client:
        stream = await client.relay("/v1/chat/completions",
                                    {"model": "m", "messages": USER, "stream": True})
        assert (stream.server, stream.attempts) == (B, 2)
        await stream.aclose()
        await nothing_left_open(client, fleet)


async def test_a_relayed_stream_says_when_its_last_chunk_came() -> None:
    """`at_end` holds for the last chunk only (the gateway sends it with the answer's end),
    and the chunks are the engine's bytes as they came."""
    fleet = Fleet({A: ok})
    async with fleet.client() as client:
        stream = await client.relay("/v1/chat/completions",
                                    {"model": "m", "messages": USER, "stream": True})
        seen = [(chunk, stream.at_end) async for chunk in stream]
        await nothing_left_open(client, fleet)
    sent = MockResponse.answer(MockRequest(A, "POST", "/v1/chat/completions",
                                           {"model": "m", "stream": True}, None), ANSWER).chunks
    assert b"".join(chunk for chunk, _ in seen) == b"".join(sent)  # type: ignore[arg-type]
    assert [at_end for _, at_end in seen] == [False] * (len(seen) - 1) + [True]
    assert stream.failure is None and stream.usage["completion_tokens"] == len(ANSWER.split())


# --------------------------------------------------------------------------- the pieces


def test_retry_state_is_a_value_that_remembers_each_server() -> None:
    start = RetryState.first(3)
    one = start.increment(A, Failure.REFUSED, "Connection refused")
    two = one.increment(A, Failure.REFUSED, "Connection refused")
    assert start == RetryState(attempts_left=3) and start.excluded == ()  # unchanged
    assert (one.attempts_left, one.excluded, two.attempts, two.excluded) == (2, (A,), 2, (A,))
    done = two.increment(B, Failure.SERVER_ERROR, "HTTP 500: x")
    assert done.is_exhausted() and done.excluded == (A, B)
    assert RetryState.first(0).attempts_left == 1  # at least one attempt
    reasons = done.stop("the retry budget is spent").reasons([A, B, C], {})
    assert reasons == {A: "Connection refused (2 attempts)", B: "HTTP 500: x",
                       C: "not tried: the retry budget is spent"}
    assert start.reasons([C], {C: "down (refused)"}) == {C: "down (refused)"}


@pytest.mark.parametrize(("exc", "failure", "words"), [
    (ConnectionRefusedError(111, "Connection refused"), Failure.REFUSED, "Connection refused"),
    (aiohttp.ServerDisconnectedError(), Failure.REFUSED, "closed the connection"),
    (aiohttp.ClientPayloadError("x"), Failure.REFUSED, "broke off"),
    (aiohttp.ServerTimeoutError("x"), Failure.TIMEOUT, "went silent for 1.5 s"),
    (asyncio.TimeoutError(), Failure.TIMEOUT, "request_timeout_s"),
    (aiohttp.ClientConnectionError("odd"), Failure.REFUSED, "ClientConnectionError: odd"),
])
def test_one_table_maps_transport_errors_to_failures(exc: BaseException, failure: Failure,
                                                     words: str) -> None:
    mapped = engine_failure(exc, stall_s=1.5)
    assert mapped.failure is failure and words in mapped.reason
    with pytest.raises(EngineFailure) as caught, map_exceptions(stall_s=1.5):
        raise exc
    assert (caught.value.failure, caught.value.reason) == (mapped.failure, mapped.reason)
    assert "answer deadline" in engine_failure(asyncio.TimeoutError(), whole_s=2.0).reason

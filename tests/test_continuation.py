"""Streams that outlive their server (issue 15): the sim's `continue_final_message`, then
streams broken after their first token and continued on another server, against real
sims (killed, or dropping the connection after a few tokens) and in-process servers (the
mock transport) for the edge cases.

The sims of one test share the default seed, so any of them continues any other's reply
as its own: a continued stream must give exactly the text of an unbroken one.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
from client_fleet import MESSAGES, fleet, start_sims
from helpers import free_port, http_json, metric_value
from prometheus_client import CollectorRegistry, generate_latest

from modelfleet._transports.mock import MockRequest, MockResponse, MockTransport
from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.client.continuation import continuation_body, tokens_left
from modelfleet.config import BenchmarkSpec, FleetConfig, ModelSpec, RoutingSpec, ServerSpec
from modelfleet.errors import StreamInterrupted

PIECE = re.compile(r"\s*(?:\w+|[^\w\s])")  # the sim's deltas: a word (with its space) or a mark


def _continuing(messages: list[dict], given: str, **extra: object) -> dict:
    return {"model": "m", "messages": [*messages, {"role": "assistant", "content": given}],
            "continue_final_message": True, "add_generation_prompt": False, **extra}


# ---- the sim ------------------------------------------------------------------------------


def test_the_sim_continues_a_final_assistant_message_as_vllm_does(start_sim) -> None:
    sim = start_sim(speed=200)
    url = f"{sim.url}/v1/chat/completions"
    status, whole = http_json(url, {"model": "m", "messages": MESSAGES, "max_tokens": 20})
    assert status == 200
    text, usage = whole["choices"][0]["message"]["content"], whole["usage"]
    pieces = PIECE.findall(text)
    assert "".join(pieces) == text and len(pieces) == usage["completion_tokens"] > 7

    # Given its first 7 tokens, the rest of the same reply, whole and streamed.
    status, rest = http_json(url, _continuing(MESSAGES, "".join(pieces[:7]), max_tokens=13))
    assert status == 200, rest
    assert rest["choices"][0]["message"]["content"] == "".join(pieces[7:])
    assert rest["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert rest["usage"]["prompt_tokens"] == usage["prompt_tokens"] + 7  # the answer so far
    assert rest["usage"]["completion_tokens"] == len(pieces) - 7
    chunks = list(openai.OpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
                  .chat.completions.create(
                      model="m", max_tokens=13, stream=True,
                      messages=[*MESSAGES, {"role": "assistant", "content": "".join(pieces[:7])}],
                      extra_body={"continue_final_message": True,
                                  "add_generation_prompt": False}))
    streamed = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert streamed == pieces[7:]

    # vLLM's refusals (400), in its words.
    refusals = {
        "continue_final_message and add_generation_prompt are not compatible":
            {"model": "m", "continue_final_message": True,  # add_generation_prompt defaults on
             "messages": [*MESSAGES, {"role": "assistant", "content": "The"}]},
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.":
            _continuing(MESSAGES, "The", add_generation_prompt=True),
        "Cannot set `continue_final_message` to True when the last message is not from the "
        "assistant.": {**_continuing(MESSAGES, ""), "messages": MESSAGES},
        "Input should be a valid boolean": _continuing(MESSAGES, "The", continue_final_message=3),
    }
    for message, body in refusals.items():
        status, error = http_json(url, body)
        assert status == 400 and message in error["error"]["message"], error


# ---- real sims ----------------------------------------------------------------------------


async def test_a_stream_whose_server_is_killed_mid_answer_completes_on_the_other(
        start_sim) -> None:
    a, b = start_sims(start_sim, 2, speed=1)  # 50 tokens/s: 40 tokens take 0.8 s
    registry = CollectorRegistry()
    async with AsyncModelServer(config=fleet([a, b]), metrics=registry) as client:
        unbroken = await client.chat("m", MESSAGES, max_tokens=40)
        assert unbroken.usage["completion_tokens"] == 40  # (its natural length is longer)
        stream = client.chat_stream("m", MESSAGES, max_tokens=40)
        got: list[str] = []
        async for piece in stream:
            got.append(piece)
            if len(got) == 3:  # the server has ~0.7 s of the answer left to send
                killed = a if stream.server == a.address else b
                killed.kill()
        assert "".join(got) == stream.text == unbroken.text  # nothing twice, nothing missing
        assert stream.continuations == 1 and stream.server != killed.address
        assert stream.finish_reason == "length"
        prompt = unbroken.usage["prompt_tokens"]
        assert dict(stream.usage) == {"prompt_tokens": prompt, "completion_tokens": 40,
                                      "total_tokens": prompt + 40}
        metrics = generate_latest(registry).decode()
        assert metric_value(metrics, "modelfleet_stream_continuations_total",
                            {"outcome": "continued"}) == 1
        assert metric_value(metrics, "modelfleet_requests_total", {"outcome": "ok"}) == 2
        assert metric_value(metrics, "modelfleet_requests_total",  # on the server that ended it
                            {"outcome": "ok", "server": stream.server}) >= 1
        assert metric_value(metrics, "modelfleet_requests_total", {"outcome": "interrupted"}) == 0


def test_disconnects_everywhere_are_continued_to_max_tokens_sync(start_sim) -> None:
    a, b = start_sims(start_sim, 2)
    with ModelServer(config=fleet([a, b])) as client:
        unbroken = client.chat("m", MESSAGES, max_tokens=10)
        assert unbroken.usage["completion_tokens"] == 10
        for sim in (a, b):
            sim.fault(disconnect_after_tokens=4)
        with client.chat_stream("m", MESSAGES, max_tokens=10) as stream:
            text = "".join(stream)
        # 4 tokens, 4 on the other server, the last 2 on the first again (no other left)
        assert text == stream.text == unbroken.text and stream.continuations == 2
        assert stream.usage["completion_tokens"] == 10
        assert stream.usage["prompt_tokens"] == unbroken.usage["prompt_tokens"]


async def test_continuation_turned_off_raises_stream_interrupted(start_sim) -> None:
    a, b = start_sims(start_sim, 2)
    for sim in (a, b):
        sim.fault(disconnect_after_tokens=4)
    async with AsyncModelServer(config=fleet([a, b], continue_streams=False)) as client:
        got: list[str] = []
        with pytest.raises(StreamInterrupted) as caught:
            async for piece in client.chat_stream("m", MESSAGES, max_tokens=10):
                got.append(piece)
        assert len(got) == 4 and caught.value.text_so_far == "".join(got)
        # the call's keyword wins over the fleet's setting
        stream = client.chat_stream("m", MESSAGES, max_tokens=10, continue_stream=True)
        assert len([piece async for piece in stream]) == 10 and stream.continuations == 2


async def test_no_server_left_to_continue_raises_stream_interrupted(start_sim) -> None:
    sim = start_sim(speed=1)
    registry = CollectorRegistry()
    nobody = ("127.0.0.1", free_port())  # nothing listens there
    config = fleet([sim], addresses=[nobody], max_retry=2)
    async with AsyncModelServer(config=config, metrics=registry) as client:
        got: list[str] = []
        with pytest.raises(StreamInterrupted) as caught:
            async for piece in client.chat_stream("m", MESSAGES, max_tokens=40):
                got.append(piece)
                if len(got) == 2:
                    sim.kill()
        assert caught.value.text_so_far == "".join(got) and caught.value.server == sim.address
        assert "no server could continue it" in caught.value.reason
        metrics = generate_latest(registry).decode()
        assert metric_value(metrics, "modelfleet_stream_continuations_total",
                            {"outcome": "unavailable"}) == 1
        assert metric_value(metrics, "modelfleet_requests_total",
                            {"outcome": "interrupted"}) == 1


# ---- in-process servers: the edge cases ---------------------------------------------------

ANSWER = "General Kenobi, you are a bold one"
A, B = "a:1", "b:1"


def _event(text: str | None = None, *, finish: str | None = None, **extra: object) -> bytes:
    delta = {"content": text} if text is not None else {}
    return b"data: " + json.dumps({"model": "m", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}], **extra}).encode() + b"\n\n"


def _rest(request: MockRequest) -> MockResponse:
    """A server that continues ANSWER from where the request's assistant message stops."""
    body = request.json or {}
    given = body["messages"][-1]["content"] if body.get("continue_final_message") else ""
    return MockResponse.answer(request, ANSWER[len(given):])


class Servers:
    """In-process servers "a:1" and "b:1" of a model "m", each a function of the request;
    the callers' requests are kept (the client's background probes are answered apart)."""

    def __init__(self, a, b=_rest, **routing: object) -> None:
        self.behaviours = {A: a, B: b}
        self.requests: list[MockRequest] = []
        self.transport = MockTransport(self.handle)
        self._probe = [dict(m) for m in BenchmarkSpec().messages]
        servers = (ServerSpec("a", 1), ServerSpec("b", 1))
        settings = {"policy": "round_robin", "probe_interval_s": 3600.0, "stall_timeout_s": 0.2,
                    **routing}
        self.config = FleetConfig(models={"m": ModelSpec(name="m", servers=servers)},
                                  routing=RoutingSpec(**settings))  # type: ignore[arg-type]

    def handle(self, request: MockRequest) -> MockResponse:
        if request.method == "GET":
            return MockResponse(status=404, text="no such page")
        if (request.json or {}).get("messages") == self._probe:
            return MockResponse.answer(request, "OK")
        self.requests.append(request)
        return self.behaviours[request.server](request)

    async def check_nothing_left_open(self, client: AsyncModelServer) -> None:
        servers = (await client.status())["m"].servers
        assert [s.in_flight for s in servers] == [0, 0]
        assert self.transport.open_bodies == 0


def _error_after(*pieces: str):
    """Two text events and an error event in one network chunk: the text before the error
    was read but never handed out when the read failed."""
    def answer(request: MockRequest) -> MockResponse:
        events = b"".join(_event(p) for p in pieces)
        error = b'data: {"error": {"message": "CUDA error: an illegal memory access", ' \
                b'"code": 500}}\n\n'
        return MockResponse(chunks=[_event("General"), events + error])
    return answer


async def test_an_error_event_mid_stream_is_continued_with_the_partial_answer() -> None:
    servers = Servers(_error_after(" Kenobi", ","))
    async with AsyncModelServer(config=servers.config, transport=servers.transport) as client:
        stream = client.chat_stream("m", [{"role": "user", "content": "hello there"}],
                                    max_tokens=10, temperature=0)
        assert "".join([piece async for piece in stream]) == ANSWER
        assert [r.server for r in servers.requests] == [A, B] and stream.server == B
        sent = servers.requests[1].json
        assert sent["messages"] == [{"role": "user", "content": "hello there"},
                                    {"role": "assistant", "content": "General Kenobi,"}]
        assert (sent["continue_final_message"], sent["add_generation_prompt"]) == (True, False)
        assert (sent["max_tokens"], sent["temperature"], sent["stream"]) == (7, 0, True)
        # the mock says prompt 8 and 5 tokens: 3 came before, so the prompt was 8 - 3
        assert dict(stream.usage) == {"prompt_tokens": 5, "completion_tokens": 8,
                                      "total_tokens": 13}
        await servers.check_nothing_left_open(client)


async def test_a_continued_assistant_message_grows_and_a_refusal_interrupts() -> None:
    servers = Servers(_error_after(" Kenobi"), lambda r: MockResponse.error(400, "no prefill"))
    async with AsyncModelServer(config=servers.config, transport=servers.transport) as client:
        prefilled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, "}]
        stream = client.chat_stream("m", prefilled, continue_final_message=True,
                                    add_generation_prompt=False)
        with pytest.raises(StreamInterrupted) as caught:
            async for _ in stream:
                pass
        assert caught.value.text_so_far == "General Kenobi" and caught.value.server == A
        assert "the continuation was refused" in caught.value.reason
        assert "no prefill" in caught.value.reason
        assert servers.requests[1].json["messages"][-1] == {
            "role": "assistant", "content": "Well, General Kenobi"}
        await servers.check_nothing_left_open(client)


async def test_a_break_after_the_last_token_asked_for_ends_the_stream() -> None:
    def all_but_the_end(request: MockRequest) -> MockResponse:
        return MockResponse(chunks=[_event("General"), _event(" Kenobi"),
                                    ConnectionResetError(104, "Connection reset by peer")])
    servers = Servers(all_but_the_end)
    async with AsyncModelServer(config=servers.config, transport=servers.transport) as client:
        stream = client.chat_stream("m", [{"role": "user", "content": "hi"}], max_tokens=2)
        assert "".join([piece async for piece in stream]) == "General Kenobi"
        assert stream.finish_reason == "length" and stream.continuations == 0
        assert [r.server for r in servers.requests] == [A]  # nothing left to ask for
        await servers.check_nothing_left_open(client)


async def test_a_spent_retry_budget_interrupts_the_stream() -> None:
    servers = Servers(_error_after(" Kenobi"), retry_budget_ratio=0.0,
                      retry_budget_min_per_s=0.0)
    async with AsyncModelServer(config=servers.config, transport=servers.transport) as client:
        with pytest.raises(StreamInterrupted, match="retry budget is spent"):
            async for _ in client.chat_stream("m", [{"role": "user", "content": "hi"}]):
                pass
        assert [r.server for r in servers.requests] == [A]
        await servers.check_nothing_left_open(client)


def test_what_a_continuation_asks_for() -> None:
    completion = {"model": "m", "prompt": "Once upon", "max_tokens": 10, "min_tokens": 4}
    assert tokens_left(completion, 3) == 7 and tokens_left({"prompt": "x"}, 3) is None
    assert tokens_left({"max_tokens": 10, "max_completion_tokens": 5}, 3) == 2  # vLLM's order
    assert continuation_body(completion, " a time", 3) == {
        "model": "m", "prompt": "Once upon a time", "max_tokens": 7, "min_tokens": 1}
    assert continuation_body({"prompt": [1, 2, 3]}, " a time", 3) is None  # token ids

"""The wire layer: parsing on real vLLM captures, then the same code against live sims."""

from __future__ import annotations

import array
import asyncio
import json
import time

import pytest
from helpers import FIXTURES, free_port

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.aiohttp import AiohttpTransport
from modelfleet._transports.models import QueueSample
from modelfleet._transports.parse import (
    DONE,
    chunk_text,
    classify_status,
    error_message,
    parse_embeddings,
    parse_models,
    parse_queue,
    parse_sse,
    retry_after_seconds,
)
from modelfleet.config import ServerSpec
from modelfleet.errors import RequestRejected
from modelfleet.routing import Failure

# --------------------------------------------------------------------------- fixtures (vLLM)


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def _error_fixture(name: str) -> tuple[int, str]:
    body, _, status_line = _fixture(name).strip().rpartition("\n")
    return int(status_line.split()[1]), body


def test_chat_stream_fixture_assembles_text_usage_and_finish() -> None:
    text, finish, usage = [], None, None
    events = parse_sse(_fixture("chat-stream.sse"))
    assert events[-1] is DONE and len(events) == 9
    assert parse_sse(_fixture("chat-stream.sse").replace("\n", "\r\n")) == events
    for event in events[:-1]:
        delta, reason = chunk_text(event)
        text.append(delta)
        finish = reason or finish
        usage = event.get("usage") or usage
    assert "".join(text) == "ghtwezo qife nenejusi biqichstr"
    assert finish == "length"
    assert usage["completion_tokens"] == 6


def test_whole_answer_fixtures_parse() -> None:
    chat = json.loads(_fixture("chat.json"))
    assert chunk_text(chat) == ("erch podewe miantaxoerwe qigujustr mithmi bigu\x1d", "length")
    completion = json.loads(_fixture("completion.json"))
    assert chunk_text(completion) == (" lode deion anmiwe ruloqineerqibi", "length")
    assert parse_models(json.loads(_fixture("models.json"))) == ["tiny-llama"]


def test_embedding_fixtures_base64_matches_float() -> None:
    floats = parse_embeddings(json.loads(_fixture("embeddings-float.json")))
    decoded = parse_embeddings(json.loads(_fixture("embeddings-base64.json")))
    assert len(floats) == 2 and len(decoded) == 1  # the float capture embedded two inputs
    assert len(decoded[0]) == len(floats[0]) > 10
    # the float answer is float32 printed as a double: equal after rounding to float32
    assert decoded[0] == array.array("f", floats[0]).tolist()
    np = pytest.importorskip("numpy")
    matrix = parse_embeddings(json.loads(_fixture("embeddings-base64.json")), as_numpy=True)
    assert matrix.shape == (1, len(floats[0])) and matrix.dtype == np.float32
    assert matrix[0].tolist() == decoded[0]


def test_embeddings_are_put_in_index_order() -> None:
    payload = {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]}
    assert parse_embeddings(payload) == [[1.0], [2.0]]


@pytest.mark.parametrize(("name", "status", "words"), [
    ("error-negative-max-tokens.txt", 400, "max_tokens must be at least 1"),
    ("error-prompt-too-long.txt", 400, "maximum context length is 512"),
    ("error-bad-json.txt", 400, "JSON decode error"),
])
def test_request_errors_become_request_rejected(name: str, status: int, words: str) -> None:
    code, body = _error_fixture(name)
    assert code == status
    outcome = classify_status(code, error_message(body), "h:1")
    assert isinstance(outcome, RequestRejected)
    assert words in outcome.message and outcome.server == "h:1"


def test_unknown_model_404_means_that_server_is_misconfigured() -> None:
    code, body = _error_fixture("error-unknown-model.txt")
    outcome = classify_status(code, error_message(body), "h:1")
    assert isinstance(outcome, EngineFailure)
    assert outcome.failure is Failure.MISCONFIGURED
    assert "does not exist" in outcome.reason


@pytest.mark.parametrize(("status", "failure"), [
    (429, Failure.BACKPRESSURE), (503, Failure.BACKPRESSURE), (401, Failure.MISCONFIGURED),
    (403, Failure.MISCONFIGURED), (500, Failure.SERVER_ERROR), (502, Failure.SERVER_ERROR),
])
def test_server_side_statuses_are_retryable_failures(status: int, failure: Failure) -> None:
    outcome = classify_status(status, "m", "h:1", retry_after_s=2.0)
    assert isinstance(outcome, EngineFailure) and outcome.failure is failure


def test_error_message_shapes() -> None:
    assert error_message(b'{"object":"error","message":"sglang says no","code":400}') == \
        "sglang says no"
    assert error_message('{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert error_message(b"") == "(empty body)"


def test_retry_after() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize(("name", "running", "waiting"), [
    ("metrics-chat.txt", 0, 0),
    ("metrics-chat-under-load.txt", 99, 0),
    ("metrics-embedding.txt", 0, 0),
])
def test_metrics_fixtures(name: str, running: float, waiting: float) -> None:
    assert parse_queue(_fixture(name)) == QueueSample(running=running, waiting=waiting)


def test_metrics_sglang_names_labels_and_sums() -> None:
    text = "\n".join([
        "# HELP sglang:num_running_reqs The number of running requests.",
        "# TYPE sglang:num_running_reqs gauge",
        'sglang:num_running_reqs{model_name="m",tp_rank="0"} 3.0',
        'sglang:num_running_reqs{model_name="m",tp_rank="1"} 4.0 1700000000000',
        'sglang:num_queue_reqs{model_name="a } b",note="x\\"y"} 5',
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 100.0',
        "unrelated_metric 42",
    ])
    assert parse_queue(text) == QueueSample(running=7, waiting=5)
    assert parse_queue("# nothing here\nfoo 1\n") is None
    # A gauge named in a comment or inside a longer name is no sample; CRLF lines are.
    assert parse_queue("# HELP vllm:num_requests_running 9\r\nvllm:num_requests_running_x 9"
                       "\r\nvllm:num_requests_waiting 2\r\n") == QueueSample(running=0, waiting=2)


# --------------------------------------------------------------------------- live sims


def _server(sim) -> ServerSpec:
    return ServerSpec(host=sim.host, port=sim.port)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6}


async def test_live_stream_generate_and_completions(start_sim) -> None:
    sim = start_sim(speed=200)
    wire = AiohttpTransport()
    try:
        stream = await wire.open_stream(_server(sim), "/v1/chat/completions", CHAT,
                                        api_key=None, stall_s=5, timeout_s=30)
        pieces = [piece async for piece in stream]
        assert pieces and all(pieces)
        assert stream.usage["completion_tokens"] == 6 and stream.finish_reason
        whole = await wire.generate(_server(sim), "/v1/chat/completions", CHAT,
                                    api_key=None, stall_s=5, timeout_s=30)
        assert whole.text and whole.output_tokens == 6 and whole.model == "m"
        assert 0 < whole.ttft_s <= whole.total_s
        done = await wire.generate(_server(sim), "/v1/completions",
                                   {"model": "m", "prompt": "Once upon", "max_tokens": 4},
                                   api_key=None, stall_s=5, timeout_s=30)
        assert done.text and done.usage["completion_tokens"] == 4
        assert await wire.health(_server(sim))
        queue = await wire.queue(_server(sim))
        assert queue == QueueSample(running=0, waiting=0)
        assert await wire.models(_server(sim)) == ["m"]
    finally:
        await wire.close()


async def test_live_whole_answer_equals_the_streamed_one(start_sim) -> None:
    sim = start_sim(speed=200)
    wire = AiohttpTransport()
    try:
        for path, body in (("/v1/chat/completions", CHAT),
                           ("/v1/completions", {"model": "m", "prompt": "Once", "max_tokens": 5})):
            streamed = await wire.generate(_server(sim), path, body, api_key=None, stall_s=5,
                                           timeout_s=30)
            whole = await wire.generate_whole(_server(sim), path, body, api_key=None,
                                              deadline_s=5)
            assert whole.ttft_s is None and streamed.ttft_s is not None  # no SSE: not seen
            assert (whole.text, whole.usage, whole.finish_reason, whole.model,
                    whole.output_tokens) == (streamed.text, streamed.usage,
                                             streamed.finish_reason, streamed.model,
                                             streamed.output_tokens)
        sim.fault(hang=True)
        started = time.monotonic()
        with pytest.raises(EngineFailure) as caught:
            await wire.generate_whole(_server(sim), "/v1/chat/completions", CHAT, api_key=None,
                                      deadline_s=0.5)
        assert caught.value.failure is Failure.TIMEOUT and "answer deadline" in caught.value.reason
        assert time.monotonic() - started < 10
    finally:
        await wire.close()


async def test_live_embeddings_base64_equal_float_answer(start_sim) -> None:
    sim = start_sim(model="e", kind="embedding", speed=200, dim=32)
    wire = AiohttpTransport()
    inputs = [f"sentence {i}" for i in range(5)]
    try:
        got = await wire.embed(_server(sim), {"model": "e", "input": inputs}, api_key=None,
                               stall_s=5, timeout_s=30)
        async with wire.session.post(f"{sim.url}/v1/embeddings",
                                     json={"model": "e", "input": inputs}) as response:
            plain = await response.json()
    finally:
        await wire.close()
    expected = [array.array("f", item["embedding"]).tolist()
                for item in sorted(plain["data"], key=lambda d: d["index"])]
    assert got.vectors == expected and len(got.vectors[0]) == 32
    assert got.usage.get("prompt_tokens", 0) > 0


async def test_live_bad_request_is_rejected_with_the_servers_message(start_sim) -> None:
    sim = start_sim(speed=200)
    wire = AiohttpTransport()
    try:
        with pytest.raises(RequestRejected) as caught:
            await wire.generate(_server(sim), "/v1/chat/completions", {**CHAT, "max_tokens": -5},
                                api_key=None, stall_s=5, timeout_s=30)
    finally:
        await wire.close()
    assert caught.value.status == 400 and "max_tokens" in caught.value.message
    assert caught.value.server == sim.address


@pytest.mark.parametrize(("fault", "failure"), [
    ({"error_rate": 1.0, "error_status": 503}, Failure.BACKPRESSURE),
    ({"error_rate": 1.0, "error_status": 429}, Failure.BACKPRESSURE),
    ({"error_rate": 1.0, "error_status": 500}, Failure.SERVER_ERROR),
    ({"hang": True}, Failure.TIMEOUT),
    ({"stall_after_tokens": 2}, Failure.TIMEOUT),
    ({"disconnect_after_tokens": 2}, Failure.REFUSED),
])
async def test_live_faults_map_to_failure_kinds(start_sim, fault: dict, failure: Failure) -> None:
    sim = start_sim(speed=200)
    sim.fault(**fault)
    wire = AiohttpTransport()
    started = time.monotonic()
    try:
        with pytest.raises(EngineFailure) as caught:
            await wire.generate(_server(sim), "/v1/chat/completions", CHAT, api_key=None,
                                stall_s=0.5, timeout_s=30)
    finally:
        await wire.close()
    assert caught.value.failure is failure, caught.value.reason
    assert time.monotonic() - started < 10  # a stall costs the stall deadline, not the timeout


async def test_refused_connection() -> None:
    wire = AiohttpTransport()
    try:
        with pytest.raises(EngineFailure) as caught:
            await wire.generate(ServerSpec("127.0.0.1", free_port()), "/v1/chat/completions",
                                CHAT, api_key=None, stall_s=1, timeout_s=5)
        assert not await wire.health(ServerSpec("127.0.0.1", free_port()), timeout_s=1)
    finally:
        await wire.close()
    assert caught.value.failure is Failure.REFUSED


async def test_api_key_is_sent_as_bearer(start_sim) -> None:
    sim = start_sim(speed=200, api_key="s3cret-key")
    wire = AiohttpTransport()
    try:
        with pytest.raises(EngineFailure) as caught:
            await wire.generate(_server(sim), "/v1/chat/completions", CHAT, api_key="wrong",
                                stall_s=5, timeout_s=30)
        assert caught.value.failure is Failure.MISCONFIGURED
        assert "s3cret" not in caught.value.reason
        ok = await wire.generate(_server(sim), "/v1/chat/completions", CHAT,
                                 api_key="s3cret-key", stall_s=5, timeout_s=30)
        assert ok.output_tokens == 6
    finally:
        await wire.close()


async def test_requests_say_who_sent_them_and_carry_json() -> None:
    """The User-Agent is modelfleet's (not aiohttp's), every POST says application/json,
    and a body orjson will not take (a non-string key, an integer over 64 bits) still
    goes out as the standard library writes it."""
    from aiohttp import web

    seen: list[tuple[str, str, bytes]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.headers.get("User-Agent", ""),
                     request.headers.get("Content-Type", ""), await request.read()))
        return web.json_response({"model": "m", "usage": {"completion_tokens": 1},
                                  "choices": [{"message": {"content": "ok"},
                                               "finish_reason": "stop"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    wire = AiohttpTransport()
    server = ServerSpec(host="127.0.0.1", port=port)
    try:
        for body in (CHAT, {**CHAT, "logit_bias": {1: 2**70}}):
            got = await wire.generate_whole(server, "/v1/chat/completions", body,
                                            api_key=None, deadline_s=10)
            assert got.text == "ok" and got.output_tokens == 1
    finally:
        await wire.close()
        await runner.cleanup()
    assert [(agent, kind) for agent, kind, _ in seen] == [("modelfleet", "application/json")] * 2
    assert json.loads(seen[0][2])["messages"] == CHAT["messages"]
    assert json.loads(seen[1][2])["logit_bias"] == {"1": 2**70}


async def test_leaving_a_stream_early_frees_the_servers_slot(start_sim) -> None:
    sim = start_sim(speed=20)
    wire = AiohttpTransport()
    try:
        stream = await wire.open_stream(_server(sim), "/v1/chat/completions",
                                        {**CHAT, "max_tokens": 500}, api_key=None, stall_s=5,
                                        timeout_s=60)
        assert await stream.__anext__()
        assert (await wire.queue(_server(sim))).running == 1
        await stream.aclose()
        deadline = time.monotonic() + 10
        while (await wire.queue(_server(sim))).running != 0:
            assert time.monotonic() < deadline, "the sim kept running the abandoned request"
            await asyncio.sleep(0.02)
    finally:
        await wire.close()


async def test_waiting_for_a_pooled_connection_is_not_server_latency(start_sim) -> None:
    sim = start_sim(speed=10)  # one reply of 6 tokens takes about 0.12 s
    wire = AiohttpTransport(limit_per_host=1)  # the second request waits for the first one's connection
    started = time.perf_counter()
    try:
        first, second = await asyncio.gather(*[
            wire.generate(_server(sim), "/v1/chat/completions", CHAT, api_key=None, stall_s=5,
                          timeout_s=30) for _ in range(2)])
    finally:
        await wire.close()
    elapsed = time.perf_counter() - started
    slower = max(first.total_s, second.total_s)
    assert slower < 0.75 * elapsed, (first.total_s, second.total_s, elapsed)


@pytest.mark.parametrize(("name", "hits", "queries", "usage", "capacity"), [
    ("metrics-chat.txt", 0.0, 25.0, 0.0, 1048576.0),
    ("metrics-chat-under-load.txt", 0.0, 1200.0, 0.03625930899768037, 1048576.0),
    ("metrics-embedding.txt", 0.0, 0.0, 0.0, 0.0),  # enable_prefix_caching="False"
])
def test_metrics_fixtures_prefix_cache(name: str, hits: float, queries: float, usage: float,
                                       capacity: float) -> None:
    cache = parse_queue(_fixture(name)).cache
    assert (cache.hits, cache.queries, cache.usage, cache.capacity_tokens) == \
        (hits, queries, usage, capacity)


def test_metrics_prefix_cache_older_names_and_engines() -> None:
    text = "\n".join([
        'vllm:num_requests_running{engine="0"} 1',
        'vllm:gpu_prefix_cache_hits_total{engine="0"} 30',
        'vllm:gpu_prefix_cache_hits_total{engine="1"} 10',
        'vllm:gpu_prefix_cache_queries_total{engine="0"} 100',
        'vllm:gpu_prefix_cache_queries_total{engine="1"} 60',
        'vllm:gpu_cache_usage_perc{engine="0"} 0.2',
        'vllm:gpu_cache_usage_perc{engine="1"} 0.4',
        'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="100"} 1',
    ])
    cache = parse_queue(text).cache
    assert (cache.hits, cache.queries, cache.capacity_tokens) == (40, 160, 1600)
    assert cache.usage == pytest.approx(0.3) and cache.hit_ratio == pytest.approx(0.25)
    sglang = parse_queue("sglang:num_running_reqs 2\nsglang:token_usage 0.5\n"
                         "sglang:max_total_num_tokens 50000\nsglang:cache_hit_rate 0.7\n").cache
    assert (sglang.usage, sglang.capacity_tokens, sglang.hit_ratio) == (0.5, 50000, 0.7)
    assert parse_queue('vllm:num_requests_running{engine="0"} 1').cache is None

"""The pinned vLLM still speaks the wire the project was built on.

The fast tier parses responses, errors and /metrics from samples captured on vLLM 0.32.0
(tests/helpers.py:FIXTURES, kept in tests/fixtures/). These tests hold live servers of the same version against
those samples, so an upgrade that changes a metric name or an error body fails here, by
name, instead of quietly breaking routing. The servers are started straight from the venv,
not by the launcher, so a failure here is about vLLM, not modelfleet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import FIXTURES, metric_value
from vllm_server import VllmServer, metric_families, start_vllm

# What modelfleet's routing and report read from a vLLM server.
ROUTING_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:time_to_first_token_seconds", "vllm:kv_cache_usage_perc",
                   "vllm:e2e_request_latency_seconds", "http_requests_total")


def fixture_body(name: str) -> dict:
    """The JSON body of a captured error (the file's first line; the status follows)."""
    return json.loads((FIXTURES / name).read_text().splitlines()[0])


@pytest.fixture(scope="module")
def servers(vllm_venv, tiny_models, tmp_path_factory) -> Iterator[dict[str, VllmServer]]:
    """A chat server on core 0 and an embedding server on core 1, started side by side."""
    logs = tmp_path_factory.mktemp("vllm-wire")
    started = {
        "chat": start_vllm(vllm_venv.python, tiny_models["chat"], "tiny-llama", cpu=0,
                           log_dir=logs),
        "embedding": start_vllm(vllm_venv.python, tiny_models["embedding"], "tiny-bert", cpu=1,
                                log_dir=logs, extra=("--runner", "pooling")),
    }
    try:
        with ThreadPoolExecutor(2) as pool:
            for seconds in pool.map(VllmServer.wait_healthy, started.values()):
                print(f"vLLM healthy after {seconds:.1f}s")
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def chat(servers: dict[str, VllmServer]) -> VllmServer:
    return servers["chat"]


@pytest.fixture
def embedding(servers: dict[str, VllmServer]) -> VllmServer:
    return servers["embedding"]


def test_models_lists_the_served_name_and_context(chat: VllmServer) -> None:
    listing = json.loads(chat.get_text("/v1/models"))
    assert [(m["id"], m["max_model_len"]) for m in listing["data"]] == [("tiny-llama", 512)]


def test_chat_usage_matches_the_server_token_counters(chat: VllmServer) -> None:
    before = chat.get_text("/metrics")
    status, body = chat.post("/v1/chat/completions", {
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Say OK."}],
        "max_tokens": 8, "ignore_eos": True})
    after = chat.get_text("/metrics")
    assert status == 200, body
    usage = body["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert (metric_value(after, "vllm:prompt_tokens_total")
            - metric_value(before, "vllm:prompt_tokens_total")) == usage["prompt_tokens"]
    assert (metric_value(after, "vllm:generation_tokens_total")
            - metric_value(before, "vllm:generation_tokens_total")) == 8


def test_stream_ends_with_usage_then_done(chat: VllmServer) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{chat.url}/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 5, "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[len(b"data: "):] for line in r.read().splitlines()
                  if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    final = json.loads(events[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    finishes = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert finishes[-1] == "length"


def test_prompt_over_max_model_len_is_the_captured_400(chat: VllmServer) -> None:
    before = chat.get_text("/metrics")
    status, body = chat.post("/v1/completions", {
        "model": "tiny-llama", "prompt": "hello world " * 400, "max_tokens": 4})
    after = chat.get_text("/metrics")
    assert status == 400
    assert body == fixture_body("error-prompt-too-long.txt")
    client_errors = {"handler": "/v1/completions", "status": "4xx"}
    assert (metric_value(after, "http_requests_total", client_errors)
            - metric_value(before, "http_requests_total", client_errors)) == 1
    assert metric_value(after, "vllm:prompt_tokens_total") == metric_value(
        before, "vllm:prompt_tokens_total")


def test_unknown_model_is_the_captured_404(chat: VllmServer) -> None:
    status, body = chat.post("/v1/chat/completions", {
        "model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 404
    assert body == fixture_body("error-unknown-model.txt")


def test_metrics_keep_every_captured_family(chat: VllmServer, embedding: VllmServer) -> None:
    chat.post("/v1/completions", {"model": "tiny-llama", "prompt": "a", "max_tokens": 2})
    embedding.post("/v1/embeddings", {"model": "tiny-bert", "input": "a"})
    for server, sample in ((chat, "metrics-chat.txt"), (embedding, "metrics-embedding.txt")):
        live = metric_families(server.get_text("/metrics"))
        captured = metric_families((FIXTURES / sample).read_text())
        wanted = {f for f in captured if f.startswith(("vllm:", "http_"))}
        assert wanted - live == set(), f"{server.served_name} lost metric families"
        assert set(ROUTING_METRICS) <= live


def test_embeddings_are_deterministic_and_counted(embedding: VllmServer) -> None:
    before = embedding.get_text("/metrics")
    status, body = embedding.post("/v1/embeddings", {
        "model": "tiny-bert", "input": ["benchmark sentence", "other words", "benchmark sentence"]})
    after = embedding.get_text("/metrics")
    assert status == 200, body
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert {len(v) for v in vectors} == {64}
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert body["usage"]["completion_tokens"] == 0
    assert (metric_value(after, "vllm:prompt_tokens_total")
            - metric_value(before, "vllm:prompt_tokens_total")) == body["usage"]["prompt_tokens"]
    captured = json.loads((FIXTURES / "embeddings-float.json").read_text())
    assert body.keys() == captured.keys()

"""`modelfleet gateway` against real sims, through the official openai client and plain HTTP.

One gateway (a subprocess, on a free loopback port) serves every test here; its fleet
has a fast chat model with an alias, a slow one (streams long enough to leave midway),
an embedding model, and a model whose only server is down. It asks for an API key and
has small limits, so 401, 413 and 429 are reachable.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator

import openai
import pytest
from helpers import SimProcess, free_port, metric_value, write_fleet
from ruamel.yaml import YAML

from modelfleet.testing import HOST, GatewayProcess
from modelfleet.testing import running as sims_running

KEY = "sk-gateway-test-0123456789"
PROMPT = "PROMPT-TEXT-NEVER-LOGGED"
MAX_BODY = 8192


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimProcess]]:
    started = {
        "chat-a": SimProcess(free_port(), "chat", flags={"speed": 50}),
        "chat-b": SimProcess(free_port(), "chat", flags={"speed": 50}),
        "slow": SimProcess(free_port(), "slow", flags={"speed": 1}),
        "emb": SimProcess(free_port(), "emb", "embedding", flags={"speed": 50}),
    }
    with sims_running(started.values()):
        yield started


@pytest.fixture(scope="module")
def gateway(sims: dict[str, SimProcess], tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("gateway")
    server = lambda sim: {"host": HOST, "port": sim.port}  # noqa: E731
    path = write_fleet(folder / "fleet.yaml", {
        "chat": {"backend": "sim", "aliases": ["small"],
                 "servers": [server(sims["chat-a"]), server(sims["chat-b"])]},
        "slow": {"backend": "sim", "servers": [server(sims["slow"])]},
        "emb": {"backend": "sim", "kind": "embedding", "servers": [server(sims["emb"])]},
        "dead": {"backend": "sim", "servers": [{"host": HOST, "port": free_port()}]},
    }, routing={"probe_interval_s": 1, "max_retry": 2})
    doc = YAML().load(path)
    doc["gateway"] = {"api_keys": ["${GATEWAY_TEST_KEY}"], "max_body_bytes": MAX_BODY,
                      "max_concurrent": 3}
    YAML().dump(doc, path)
    gw = GatewayProcess(path, free_port(), log_path=folder / "gateway.log",
                        env={"GATEWAY_TEST_KEY": KEY}).spawn()
    try:
        yield gw.wait_ready()
    finally:
        assert gw.stop() == 0, gw.output()


def client(gw: GatewayProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


def request(gw: GatewayProcess, method: str, path: str, body: bytes | dict | None = None, *,
            key: str | None = KEY, headers: dict[str, str] | None = None,
            ) -> tuple[int, dict, dict[str, str]]:
    """One plain HTTP request: status, decoded JSON body, headers."""
    conn = http.client.HTTPConnection(HOST, gw.port, timeout=30)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        try:
            decoded = json.loads(raw or b"{}")
        except ValueError:  # /metrics
            decoded = {"text": raw.decode()}
        return response.status, decoded, dict(response.getheaders())
    finally:
        conn.close()


def assert_openai_error(body: dict, *, mentions: str = "") -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "code"}, body
    assert isinstance(error["message"], str) and error["message"]
    assert mentions in error["message"], body


# -- the official openai client ------------------------------------------------------------

def test_chat_through_the_openai_client_whole_and_streamed(gateway: GatewayProcess) -> None:
    api = client(gateway)
    answer = api.chat.completions.create(model="small", max_tokens=6, temperature=0.5,
                                         messages=[{"role": "user", "content": PROMPT}])
    assert answer.model == "chat"  # the alias became the server's name on the wire
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 6

    pieces = [chunk.choices[0].delta.content or ""
              for chunk in api.chat.completions.create(
                  model="chat", max_tokens=8, stream=True, stream_options={"include_usage": True},
                  messages=[{"role": "user", "content": PROMPT}]) if chunk.choices]
    assert "".join(pieces).strip()

    text = api.completions.create(model="chat", prompt=PROMPT, max_tokens=4)
    assert text.choices[0].text and text.usage.completion_tokens == 4
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="chat", prompt=PROMPT, max_tokens=4, stream=True) if c.choices)
    assert streamed.strip()


def test_embeddings_through_the_openai_client_base64_and_float(gateway: GatewayProcess) -> None:
    api = client(gateway)
    default = api.embeddings.create(model="emb", input=["one", "two"])  # asks for base64
    floats = api.embeddings.create(model="emb", input=["one", "two"], encoding_format="float")
    assert [len(d.embedding) for d in default.data] == [384, 384]
    for a, b in zip(default.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)


async def test_the_async_openai_client_streams_and_embeds(gateway: GatewayProcess) -> None:
    api = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    try:
        async def one(i: int) -> str:
            stream = await api.chat.completions.create(
                model="chat", max_tokens=5, stream=True,
                messages=[{"role": "user", "content": f"{PROMPT} {i}"}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one(i) for i in range(3)))  # max_concurrent: 3
        assert all(text.strip() for text in texts)
        vectors = await api.embeddings.create(model="emb", input="three")
        assert len(vectors.data[0].embedding) == 384
    finally:
        await api.close()


def test_models_lists_models_and_aliases(gateway: GatewayProcess) -> None:
    listed = {m.id: m for m in client(gateway).models.list()}
    assert {"chat", "small", "slow", "emb", "dead"} <= set(listed)


def test_a_failing_server_is_routed_around_before_the_first_byte(
        gateway: GatewayProcess, sims: dict[str, SimProcess]) -> None:
    api = client(gateway)
    sims["chat-a"].fault(error_rate=1.0, error_status=503)
    before = len(gateway.output())
    deadline = time.monotonic() + 15
    try:
        # Until a request met chat-a first (and moved on): each succeeds all the same.
        while "attempts=2" not in gateway.output()[before:]:
            assert time.monotonic() < deadline, "no request was ever sent to chat-a"
            pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
                model="chat", max_tokens=4, stream=True,
                messages=[{"role": "user", "content": "hi"}]) if c.choices]
            assert "".join(pieces).strip()
            whole = api.chat.completions.create(model="chat", max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}])
            assert whole.choices[0].message.content
    finally:
        sims["chat-a"].fault(reset=True)
    log = gateway.output()[before:]
    assert f"server=127.0.0.1:{sims['chat-a'].port} status=200" not in log


# -- errors in OpenAI's shape -----------------------------------------------------------------

def test_without_a_valid_key_the_answer_is_401(gateway: GatewayProcess) -> None:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "sk-wrong", KEY + "x"):
        status, body, _ = request(gateway, "POST", "/v1/chat/completions", chat, key=key)
        assert status == 401, body
        assert_openai_error(body)
        assert KEY not in json.dumps(body)
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-wrong").models.list()
    status, _, _ = request(gateway, "GET", "/metrics", key=None)  # open unless configured
    assert status == 200


def test_unknown_model_is_404_naming_the_known_ones(gateway: GatewayProcess) -> None:
    status, body, _ = request(gateway, "POST", "/v1/chat/completions",
                              {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404
    assert_openai_error(body, mentions="gpt-9")
    assert "chat" in body["error"]["message"] and "emb" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(gateway).embeddings.create(model="gpt-9", input="x")


@pytest.mark.parametrize(("path", "body", "mentions"), [
    ("/v1/chat/completions", b'{"model": "chat", "messages": [', "not JSON"),
    ("/v1/chat/completions", b'["chat"]', "JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/chat/completions", {"model": "chat"}, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": "hi"}, "messages"),
    ("/v1/completions", {"model": "chat"}, "prompt"),
    ("/v1/embeddings", {"model": "emb", "input": []}, "input"),
    ("/v1/embeddings", {"model": "chat", "input": "x"}, "chat model"),
])
def test_a_malformed_body_is_400_saying_what_is_wrong(gateway: GatewayProcess, path: str,
                                                      body: bytes | dict, mentions: str) -> None:
    status, answer, _ = request(gateway, "POST", path, body)
    assert status == 400, answer
    assert_openai_error(answer, mentions=mentions)


def test_an_engines_4xx_passes_through_with_its_status(gateway: GatewayProcess) -> None:
    status, body, _ = request(gateway, "POST", "/v1/chat/completions", {
        "model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 7})
    assert status == 400
    assert_openai_error(body, mentions="max_tokens")
    with pytest.raises(openai.BadRequestError):
        client(gateway).chat.completions.create(
            model="chat", max_tokens=10 ** 7, messages=[{"role": "user", "content": "x"}])


def test_no_usable_server_is_503_with_retry_after_and_health_names_the_model(
        gateway: GatewayProcess) -> None:
    status, body, headers = request(gateway, "POST", "/v1/chat/completions", {
        "model": "dead", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert status == 503
    assert_openai_error(body, mentions="dead")
    assert int(headers["Retry-After"]) >= 1
    status, body, _ = request(gateway, "GET", "/health", key=None)
    assert status == 503
    assert set(body["models_without_server"]) == {"dead"}


def test_a_body_over_the_limit_is_413(gateway: GatewayProcess) -> None:
    big = {"model": "emb", "input": "x" * (MAX_BODY + 1)}
    status, body, _ = request(gateway, "POST", "/v1/embeddings", big)
    assert status == 413
    assert_openai_error(body, mentions=str(MAX_BODY))


def test_requests_over_max_concurrent_get_429_with_retry_after(gateway: GatewayProcess) -> None:
    held = [open_stream(gateway, "slow", max_tokens=400) for _ in range(3)]
    try:
        for sock in held:
            read_until(sock, b"data:")  # each is being answered now
        status, body, headers = request(gateway, "POST", "/v1/embeddings",
                                        {"model": "emb", "input": "x"})
        assert status == 429
        assert_openai_error(body)
        assert int(headers["Retry-After"]) >= 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while request(gateway, "POST", "/v1/embeddings", {"model": "emb", "input": "x"})[0] == 429:
        assert time.monotonic() < deadline, "the held requests never left the gateway"


# -- a client that leaves cancels the engine's work ---------------------------------------------

def open_stream(gw: GatewayProcess, model: str, *, max_tokens: int,
                stream: bool = True) -> socket.socket:
    body = json.dumps({"model": model, "stream": stream, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()
    sock = socket.create_connection((HOST, gw.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        data = sock.recv(65536)
        assert data, f"the connection closed before {marker!r}: {seen[:300]!r}"
        seen += data
    return seen


def running(sim: SimProcess) -> float:
    return metric_value(sim.metrics(), "vllm:num_requests_running")


def wait_running(sim: SimProcess, wanted: float, within_s: float) -> float:
    """Seconds until the sim runs `wanted` requests; fails after `within_s`."""
    started = time.monotonic()
    while running(sim) != wanted:
        assert time.monotonic() - started < within_s, \
            f"{sim.model} still runs {running(sim)} requests after {within_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_leaves_cancels_the_upstream_request(
        gateway: GatewayProcess, sims: dict[str, SimProcess], stream: bool) -> None:
    slow = sims["slow"]
    wait_running(slow, 0, within_s=10)  # what other tests left has ended
    sock = open_stream(gateway, "slow", max_tokens=400, stream=stream)  # ~9 s of tokens
    try:
        if stream:
            read_until(sock, b"data:")
        wait_running(slow, 1, within_s=10)
        assert gateway_in_flight(gateway) == 1
    finally:
        sock.close()
    wait_running(slow, 0, within_s=1.0)
    started = time.monotonic()
    while gateway_in_flight(gateway) != 0:  # the gateway's own count drops with it
        assert time.monotonic() - started < 1.0, "the gateway still counts the request"
        time.sleep(0.02)


def gateway_in_flight(gw: GatewayProcess) -> float:
    status, body, _ = request(gw, "GET", "/metrics", key=None)
    assert status == 200
    return metric_value(body["text"], "modelfleet_gateway_requests_in_flight")


# -- the access log -----------------------------------------------------------------------------

def test_the_access_log_has_a_line_per_request_and_no_key_or_prompt(
        gateway: GatewayProcess) -> None:
    client(gateway).chat.completions.create(model="small", max_tokens=3,
                                            messages=[{"role": "user", "content": PROMPT}])
    log = gateway.output()
    assert KEY not in log and PROMPT not in log
    lines = [line for line in log.splitlines() if "POST /v1/chat/completions model=small" in line]
    assert lines, log[-2000:]
    last = lines[-1]
    for field in ("server=127.0.0.1:", "status=200", "latency_ms=", "tokens_in=", "tokens_out=3",
                  "attempts=1"):
        assert field in last, last


def test_metrics_count_whole_answers_and_streams_and_show_no_key(gateway: GatewayProcess) -> None:
    def scrape() -> str:
        status, body, _ = request(gateway, "GET", "/metrics", key=None)
        assert status == 200
        return body["text"]

    def ok(text: str) -> float:
        return metric_value(text, "modelfleet_requests_total", {"model": "chat", "outcome": "ok"})

    before = scrape()
    oa = client(gateway)
    oa.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                               max_tokens=4)
    pieces = list(oa.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True))
    assert pieces
    # A stream is counted at its end, just after its last bytes reach the client.
    deadline = time.monotonic() + 10
    while ok(after := scrape()) - ok(before) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # one whole answer and one stream, each counted once, at its end
    assert ok(after) - ok(before) == 2, after
    ttft = "modelfleet_time_to_first_token_seconds_count"
    assert metric_value(after, ttft, {"model": "chat"}) > metric_value(before, ttft, {"model": "chat"})
    assert KEY not in after
    assert not [line for line in after.splitlines() if line.startswith("vllm:")]

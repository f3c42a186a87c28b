"""The simulated engine, end to end: real `modelfleet sim` processes, real HTTP, the official client.

Everything else (client, launcher, demo, benchmarks) trusts the sim to look
and behave like vLLM, so these tests compare its bodies with the real vLLM
samples in FIXTURES and check the behaviour under load and faults that
routing depends on.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import math
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import aiohttp
import openai
import psutil
import pytest
from helpers import (
    FIXTURES,
    SimProcess,
    free_port,
    http_json,
    http_text,
    metric_value,
    run_cli,
    sim_argv,
    wait_http_ok,
)

CHAT = {"role": "user", "content": "Say OK."}


def _launch(model: str, kind: str, **flags: object) -> SimProcess:
    return SimProcess(free_port(), model, kind, flags=flags).spawn().wait_ready(timeout=30)


def _finish(sim: SimProcess) -> None:
    sim.close()


@pytest.fixture(scope="module")
def chat_sim() -> Iterator[SimProcess]:
    """One chat sim for the tests that only send requests (starting one costs ~0.3 s of CPU)."""
    sim = _launch("m", "chat", speed=200, max_model_len=64)
    yield sim
    _finish(sim)


@pytest.fixture(scope="module")
def embed_sim() -> Iterator[SimProcess]:
    sim = _launch("e", "embedding", speed=200, dim=64)
    yield sim
    _finish(sim)


@pytest.fixture(scope="module")
def _fault_sim() -> Iterator[SimProcess]:
    sim = _launch("m", "chat", speed=5)
    yield sim
    _finish(sim)


@pytest.fixture
def fault_sim(_fault_sim: SimProcess) -> Iterator[SimProcess]:
    """A sim shared by the fault tests, with its faults cleared before and after each."""
    _fault_sim.fault(reset=True)
    yield _fault_sim
    _fault_sim.fault(reset=True)


def client(sim, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", "unused")
    kw.setdefault("timeout", 10)
    return openai.OpenAI(base_url=f"{sim.url}/v1", max_retries=0, **kw)


def chat_body(model: str = "m", **extra) -> dict:
    return {"model": model, "messages": [CHAT], "max_tokens": 8, **extra}


def keys(obj: object) -> object:
    """The shape of a JSON value: dict keys all the way down, first list element only."""
    if isinstance(obj, dict):
        return {k: keys(v) for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        return [keys(obj[0])]
    return None


def sse_events(raw: str) -> list[str]:
    return [block[len("data: "):] for block in raw.split("\n\n") if block.startswith("data: ")]


# ---- the official client ----------------------------------------------------------------------


def test_openai_chat_has_consistent_usage(chat_sim):
    sim = chat_sim
    r = client(sim).chat.completions.create(model="m", messages=[CHAT], max_tokens=12)
    assert r.model == "m" and r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens + r.usage.completion_tokens == r.usage.total_tokens
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 12)


def test_openai_stream_deltas_match_usage(chat_sim):
    sim = chat_sim
    stream = client(sim).chat.completions.create(
        model="m", messages=[CHAT], max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(finishes) == 1
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == len(deltas) >= 1
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens
    # The same request unstreamed gives the same text (deterministic from seed and prompt).
    whole = client(sim).chat.completions.create(model="m", messages=[CHAT], max_tokens=10)
    assert whole.choices[0].message.content == "".join(deltas)


def test_openai_completions_one_and_many_prompts(chat_sim):
    sim = chat_sim
    c = client(sim)
    one = c.completions.create(model="m", prompt="Once upon a time", max_tokens=5)
    assert one.object == "text_completion" and one.choices[0].text
    assert one.usage.prompt_tokens == 4
    many = c.completions.create(model="m", prompt=["Once upon", "a time there"], max_tokens=5)
    assert [ch.index for ch in many.choices] == [0, 1]
    assert many.usage.prompt_tokens == 2 + 3
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens
    pieces = list(c.completions.create(model="m", prompt="Once upon a time", max_tokens=5,
                                       stream=True))
    assert "".join(p.choices[0].text for p in pieces) == one.choices[0].text


def test_openai_embeddings_float_and_base64(embed_sim):
    sim = embed_sim
    c = client(sim)
    floats = c.embeddings.create(model="e", input=["hello world", "other"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    v = floats.data[0].embedding
    assert len(v) == 64 and math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5)
    assert floats.data[1].embedding != v
    assert floats.usage.prompt_tokens == 3 and floats.usage.total_tokens == 3
    raw = c.embeddings.create(model="e", input="hello world", encoding_format="base64")
    decoded = struct.unpack("<64f", base64.b64decode(raw.data[0].embedding))
    assert list(decoded) == v
    # Without encoding_format the client asks for base64 and decodes it itself.
    default = c.embeddings.create(model="e", input="hello world")
    assert [float(x) for x in default.data[0].embedding] == v


def test_same_text_same_vector_on_every_server(embed_sim, start_sim):
    a = embed_sim  # seed 0
    b = start_sim(model="e", kind="embedding", speed=1e6, seed=2, dim=64)
    body = {"model": "e", "input": ["the same sentence", "another one"]}
    _, ra = http_json(f"{a.url}/v1/embeddings", body)
    _, rb = http_json(f"{b.url}/v1/embeddings", body)
    va = [d["embedding"] for d in ra["data"]]
    assert va == [d["embedding"] for d in rb["data"]]
    assert len(va[0]) == 64 and va[0] != va[1]


# ---- the wire format is vLLM's ----------------------------------------------------------------


def test_bodies_have_vllm_shapes(chat_sim, embed_sim):
    chat, emb = chat_sim, embed_sim
    fx = {name: json.loads((FIXTURES / name).read_text()) for name in
          ("chat.json", "completion.json", "models.json", "embeddings-float.json")}
    _, body = http_json(f"{chat.url}/v1/chat/completions", chat_body())
    assert keys(body) == keys(fx["chat.json"])
    _, body = http_json(f"{chat.url}/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 3})
    assert keys(body) == keys(fx["completion.json"])
    _, body = http_json(f"{chat.url}/v1/models")
    assert keys(body) == keys(fx["models.json"])
    _, body = http_json(f"{emb.url}/v1/embeddings", {"model": "e", "input": "x"})
    assert keys(body) == keys(fx["embeddings-float.json"])
    _, version = http_json(f"{chat.url}/version")
    assert version["version"] == json.loads((FIXTURES / "version.json").read_text())["version"]

    real = [json.loads(e) for e in sse_events((FIXTURES / "chat-stream.sse").read_text())[:-1]]
    raw = _post_raw(chat, "/v1/chat/completions", chat_body(
        max_tokens=4, stream=True, stream_options={"include_usage": True}))
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    ours = [json.loads(e) for e in events[:-1]]
    # role chunk, content chunks, the last content chunk with finish_reason, the usage chunk
    for mine, theirs in ((ours[0], real[0]), (ours[1], real[1]), (ours[-2], real[-2]),
                         (ours[-1], real[-1])):
        assert keys(mine) == keys(theirs)


def _post_raw(sim, path: str, body: dict, headers: dict | None = None) -> str:
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                      **(headers or {})})
        response = conn.getresponse()
        return response.read().decode()
    finally:
        conn.close()


def test_validation_errors_like_vllm(chat_sim):
    sim = chat_sim  # max_model_len 64
    url = f"{sim.url}/v1/chat/completions"
    four_before = sim.metric("http_requests_total",
                             {"handler": "/v1/chat/completions", "status": "4xx"})
    emb_before = sim.metric("http_requests_total", {"handler": "/v1/embeddings", "status": "4xx"})
    real_404 = json.loads((FIXTURES / "error-unknown-model.txt").read_text().splitlines()[0])
    status, body = http_json(url, chat_body(model="nope"))
    assert status == 404 and keys(body) == keys(real_404)
    assert body["error"]["message"] == "The model `nope` does not exist. Valid aliases: m."
    assert body["error"]["type"] == "NotFoundError"

    status, body = http_json(url, chat_body(max_tokens=-5))
    real = json.loads((FIXTURES / "error-negative-max-tokens.txt").read_text().splitlines()[0])
    assert (status, body) == (400, real)  # word for word, the model name is not in it

    status, body = http_json(url, {"model": "m"})
    assert status == 400 and "messages" in body["error"]["message"]
    assert body["error"]["code"] == 400

    status, body = _post_bytes(url, b'{"model": "m",')
    assert status == 400 and body["error"]["type"] == "Bad Request"
    assert "JSON decode error" in body["error"]["message"]

    status, body = http_json(url, {"model": "m", "messages": [
        {"role": "user", "content": "word " * 100}], "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "input_tokens"
    assert "maximum context length is 64 tokens" in body["error"]["message"]

    status, body = http_json(f"{sim.url}/v1/embeddings", {"model": "m", "input": "x"})
    assert status == 404 and "Embeddings API" in body["error"]["message"]

    four = sim.metric("http_requests_total", {"handler": "/v1/chat/completions", "status": "4xx"})
    assert four == four_before + 5
    assert sim.metric("http_requests_total",
                      {"handler": "/v1/embeddings", "status": "4xx"}) == emb_before + 1
    http_json(url, chat_body(max_tokens=0))
    assert sim.metric("http_requests_total",
                      {"handler": "/v1/chat/completions", "status": "4xx"}) == four + 1


def _post_bytes(url: str, raw: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_embedding_sim_refuses_chat(embed_sim):
    sim = embed_sim
    with pytest.raises(openai.NotFoundError, match="Chat Completions API"):
        client(sim).chat.completions.create(model="e", messages=[CHAT])
    status, _ = http_json(f"{sim.url}/v1/completions", {"model": "e", "prompt": "x"})
    assert status == 404


def test_api_key_required(start_sim):
    sim = start_sim(speed=1e6, api_key="s3cret-key")
    with pytest.raises(openai.AuthenticationError):
        client(sim, api_key="wrong").chat.completions.create(model="m", messages=[CHAT])
    status, body = http_json(f"{sim.url}/v1/models")
    assert status == 401 and body == {"error": "Unauthorized"}
    r = client(sim, api_key="s3cret-key").chat.completions.create(model="m", messages=[CHAT])
    assert r.choices[0].message.content
    assert http_text(f"{sim.url}/health") == ""  # health stays open, as in vLLM
    sim.stop()
    assert "s3cret-key" not in sim.proc.stderr.read().decode()


# ---- load: batch, queue, latency --------------------------------------------------------------


async def _chat_many(sim, n: int, max_tokens: int) -> list[float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> float:
            start = time.monotonic()
            async with session.post(f"{sim.url}/v1/chat/completions",
                                    json=chat_body(max_tokens=max_tokens)) as r:
                assert r.status == 200, await r.text()
                await r.read()
            return time.monotonic() - start
        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_requests_beyond_max_batch_wait_in_metrics(start_sim):
    sim = start_sim(speed=2, max_batch=4)
    burst = asyncio.ensure_future(_chat_many(sim, 16, max_tokens=16))
    seen_running, seen_waiting = 0.0, 0.0
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while not burst.done() and time.monotonic() < deadline:
            async with session.get(f"{sim.url}/metrics") as r:
                text = await r.text()
            running = metric_value(text, "vllm:num_requests_running", {"model_name": "m"})
            assert running <= 4
            seen_running = max(seen_running, running)
            seen_waiting = max(seen_waiting, metric_value(text, "vllm:num_requests_waiting"))
            await asyncio.sleep(0.02)
    await burst
    assert seen_running == 4 and seen_waiting >= 1
    text = sim.metrics()
    assert metric_value(text, "vllm:num_requests_waiting") == 0
    assert metric_value(text, "vllm:e2e_request_latency_seconds_count") == 16
    assert metric_value(text, "vllm:request_success_total") == 16
    assert metric_value(text, "vllm:generation_tokens_total") > 0
    assert metric_value(text, "vllm:time_to_first_token_seconds_bucket", {"le": "+Inf"}) == 16
    assert metric_value(text, "http_requests_total",
                        {"handler": "/v1/chat/completions", "status": "2xx"}) == 16


async def test_latency_grows_with_concurrency(start_sim):
    sim = start_sim(speed=5, batch_slowdown=0.1)
    alone = [t for _ in range(3) for t in await _chat_many(sim, 1, max_tokens=16)]
    crowded = await _chat_many(sim, 32, max_tokens=16)
    # 32 running: each token costs 1 + 0.1 x 31 = 4.1 times as much.
    assert sum(crowded) / len(crowded) > 1.5 * (sum(alone) / len(alone))


# ---- faults -----------------------------------------------------------------------------------


def _timed_chat(sim, max_tokens: int = 16) -> float:
    start = time.monotonic()
    status, body = http_json(f"{sim.url}/v1/chat/completions", chat_body(max_tokens=max_tokens))
    assert status == 200, body
    return time.monotonic() - start


def test_fault_slowdown_and_reset(fault_sim):
    sim = fault_sim  # speed 5
    base = min(_timed_chat(sim) for _ in range(2))
    assert sim.fault(slowdown=8)["slowdown"] == 8
    slow = _timed_chat(sim)
    assert slow > 3 * base
    assert sim.fault(reset=True)["slowdown"] == 1
    assert _timed_chat(sim) < slow / 2


def test_fault_error_rate_gives_status(fault_sim):
    sim = fault_sim
    url = f"{sim.url}/v1/chat/completions"
    for status in (500, 503, 429):
        cls = {"handler": "/v1/chat/completions", "status": f"{status // 100}xx"}
        before = sim.metric("http_requests_total", cls)
        sim.fault(error_rate=1.0, error_status=status)
        code, body = http_json(url, chat_body(max_tokens=1))
        assert code == status and body["error"]["code"] == status
        assert "Simulated fault" in body["error"]["message"]
        assert http_text(f"{sim.url}/health") == ""  # never faulted
        assert sim.metric("http_requests_total", cls) == before + 1
    sim.fault(reset=True)
    assert http_json(url, chat_body(max_tokens=1))[0] == 200


def test_fault_error_rate_fraction(fault_sim):
    sim = fault_sim
    sim.fault(error_rate=0.5, error_status=503)
    codes = [http_json(f"{sim.url}/v1/chat/completions", chat_body(max_tokens=1))[0]
             for _ in range(60)]
    assert set(codes) == {200, 503}
    assert 10 <= codes.count(503) <= 50


def test_fault_hang_then_reset_releases(fault_sim):
    sim = fault_sim
    sim.fault(hang=True)
    with pytest.raises(openai.APITimeoutError):
        client(sim, timeout=0.5).chat.completions.create(model="m", messages=[CHAT])
    assert http_text(f"{sim.url}/health") == ""
    assert "vllm:num_requests_running" in sim.metrics()
    released: list[tuple[int, dict]] = []
    waiter = threading.Thread(target=lambda: released.append(
        http_json(f"{sim.url}/v1/chat/completions", chat_body(), timeout=20)))
    waiter.start()
    deadline = time.monotonic() + 10
    while http_json(f"{sim.url}/sim/state")[1]["hung"] < 1:
        assert time.monotonic() < deadline, "the request never reached the hang"
        time.sleep(0.02)
    assert released == []  # still no answer
    assert sim.fault(reset=True)["hang"] is False
    waiter.join(10)
    assert released and released[0][0] == 503
    assert http_json(f"{sim.url}/v1/chat/completions", chat_body(max_tokens=1))[0] == 200


def test_fault_disconnect_breaks_a_stream(fault_sim):
    sim = fault_sim
    sim.fault(disconnect_after_tokens=2)
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    events = sse_events(info.value.partial.decode())
    assert len(events) == 3  # the role chunk and two tokens, then nothing
    conn.close()


def test_fault_stall_goes_silent_mid_stream(fault_sim):
    sim = fault_sim
    sim.fault(stall_after_tokens=1)
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=0.5)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    got = b""
    with pytest.raises(TimeoutError):
        while True:
            got += response.read1(65536)
    assert len(sse_events(got.decode())) == 2  # the role chunk and one token, then silence
    conn.close()


def test_client_leaving_frees_its_slot(fault_sim):
    """A client that walks away mid-stream takes its request out of the batch, as in vLLM."""
    sim = fault_sim  # speed 5: 1000 tokens would take 4 s
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=1000, stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.read1(65536).startswith(b"data: ")
    assert http_json(f"{sim.url}/sim/state")[1]["running"] == 1
    start = time.monotonic()
    conn.close()
    while http_json(f"{sim.url}/sim/state")[1]["running"] != 0:
        assert time.monotonic() - start < 2, "the abandoned request kept running"
        time.sleep(0.02)


def test_fault_requests_are_checked(fault_sim):
    sim = fault_sim
    for bad in ({"slowdown": 0}, {"error_rate": 2}, {"error_status": 200}, {"hang": "yes"},
                {"surprise": 1}):
        status, body = http_json(f"{sim.url}/sim/fault", bad)
        assert status == 400 and body["error"]["message"]
    assert http_json(f"{sim.url}/sim/fault")[1]["slowdown"] == 1.0
    sim.fault(slowdown=2)
    sim.fault(error_rate=0.25)
    state = http_json(f"{sim.url}/sim/fault")[1]
    assert state["slowdown"] == 2 and state["error_rate"] == 0.25  # merged, not replaced


# ---- the process ------------------------------------------------------------------------------


def test_banner_sigterm_and_worker(start_sim):
    sim = start_sim(speed=1e6, fork_worker=True)
    workers = psutil.Process(sim.proc.pid).children()
    assert len(workers) == 1
    worker = workers[0]
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=5) == 0
    assert "SIMULATED" in sim.proc.stderr.read().decode()
    psutil.wait_procs([worker], timeout=5)
    assert not worker.is_running()


def test_worker_outlives_a_killed_server():
    """A server killed outright leaves its worker: launchers must stop the whole group."""
    port = free_port()
    proc = subprocess.Popen(sim_argv(port, "m", "chat", fork_worker=True), stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc=proc)
        worker = psutil.Process(proc.pid).children()[0]
        assert worker.pid != proc.pid and _pgid(worker.pid) == _pgid(proc.pid)
        proc.kill()
        proc.wait(timeout=5)
        time.sleep(0.2)  # give a worker that wrongly follows its parent the time to die
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
        proc.stderr.close()


def _pgid(pid: int) -> int:
    return os.getpgid(pid)


def test_bad_flags_exit_2_without_traceback():
    for flags in (["--speed", "0"], ["--max-batch", "0"], ["--port", "70000"],
                  ["--kind", "vision"]):
        argv = ["sim", "--model", "m", "--port", "1"] + flags
        done = run_cli(*argv, timeout=20)
        assert done.returncode == 2, (flags, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.strip()


def test_zero_delay_mode(start_sim):
    sim = start_sim(speed=1e6)
    state = http_json(f"{sim.url}/sim/state")[1]
    assert state["zero_delay"] is True and state["running"] == 0 and state["max_batch"] == 64
    assert _timed_chat(sim, max_tokens=200) < 2  # no simulated 4 s of decoding
    sim.proc.send_signal(signal.SIGINT)
    assert sim.proc.wait(timeout=5) == 0

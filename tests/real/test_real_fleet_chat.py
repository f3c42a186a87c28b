"""Two real vLLM chat replicas, started by serve_pipeline.py, used through ModelServer.

The replicas start once for the module (about 40 s on 2 cores) and every test makes its
own client from a fleet file with the routing it needs: round_robin where a test counts
which server got what (the policy's choices are then known), fast probing where a test
waits for a server to come back. The two kill tests run last (the stream one waits for its
replica's restart; the last one leaves a restarted replica).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest
from fleet_checks import delta, ok_requests, scrape, scrape_all, worker_affinity
from helpers import FIXTURES, metric_value
from launched import LaunchedFleet, launch, vllm_cpu_model, write_fleet_file

from modelfleet.client import ModelServer
from modelfleet.errors import RequestRejected
from modelfleet.testing import GatewayProcess, free_port

MODEL = "tiny-llama"
HI = [{"role": "user", "content": "Say OK."}]
QUIET = {"probe_interval_s": 3600}  # no background probe while a test counts requests


def warm_up(client: ModelServer) -> None:
    """First use benchmarks every server (and waits for it): done before a test counts."""
    client.chat(MODEL, HI, max_tokens=1)


@dataclass
class ChatFleet:
    launched: LaunchedFleet
    models: dict
    work: Path

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s['port']}" for s in self.models[MODEL]["servers"]]

    def client(self, name: str, **routing: object) -> ModelServer:
        path = write_fleet_file(self.work / f"client-{name}.yaml", self.models, routing)
        return ModelServer(path)


@pytest.fixture(scope="module")
def fleet(vllm_venv, tiny_models, tmp_path_factory) -> Iterator[ChatFleet]:
    work = tmp_path_factory.mktemp("chat-fleet")
    models = {MODEL: vllm_cpu_model(vllm_venv.python, tiny_models["chat"], "chat", cpus=[0, 1])}
    launched = launch(write_fleet_file(work / "fleet.yaml", models), work)
    try:
        started = time.monotonic()
        launched.wait_running()
        print(f"two vLLM replicas RUNNING after {time.monotonic() - started:.1f}s")
        yield ChatFleet(launched, models, work)
    finally:
        left = launched.stop()
    assert not left, f"the launcher left engine processes behind: {left}"


def test_launcher_starts_each_replica_on_its_own_core(fleet: ChatFleet) -> None:
    running = fleet.launched.servers()
    assert sorted(running) == sorted(fleet.addresses)
    for address, cpu in zip(fleet.addresses, (0, 1), strict=True):
        assert json.loads(scrape_models(address))["data"][0]["id"] == MODEL
        port = int(address.rsplit(":", 1)[1])
        assert worker_affinity(fleet.launched.proc.pid, port) == [[cpu]]
    assert "all 2 servers RUNNING" in fleet.launched.output()


def scrape_models(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/v1/models", timeout=10) as r:
        return r.read().decode()


def test_chat_stream_and_completions_spread_over_both_replicas(fleet: ChatFleet) -> None:
    with fleet.client("spread", policy="round_robin", **QUIET) as client:
        warm_up(client)
        before = scrape_all(fleet.addresses)
        chats = [client.chat(MODEL, HI, max_tokens=4) for _ in range(6)]
        completions = [client.complete(MODEL, "Once upon", max_tokens=4) for _ in range(6)]
        streams = [list(client.chat_stream(MODEL, HI, max_tokens=4)) for _ in range(4)]
        after = scrape_all(fleet.addresses)
    assert {r.server for r in chats} == set(fleet.addresses)
    assert {r.server for r in completions} == set(fleet.addresses)
    for address in fleet.addresses:
        served_completions = sum(r.server == address for r in completions)
        assert ok_requests(after[address], "/v1/completions") - \
            ok_requests(before[address], "/v1/completions") == served_completions
    chat_handler = {a: ok_requests(after[a], "/v1/chat/completions")
                    - ok_requests(before[a], "/v1/chat/completions") for a in fleet.addresses}
    streamed_on = {a: chat_handler[a] - sum(r.server == a for r in chats) for a in fleet.addresses}
    assert sum(streamed_on.values()) == len(streams)
    assert all(n >= 1 for n in streamed_on.values()), streamed_on


def test_stream_carries_the_same_text_as_a_plain_chat(fleet: ChatFleet) -> None:
    """Greedy decoding on identical replicas: the pieces of a stream add up to the reply."""
    with fleet.client("greedy", **QUIET) as client:
        plain = client.chat(MODEL, HI, max_tokens=12, temperature=0, ignore_eos=True)
        pieces = list(client.chat_stream(MODEL, HI, max_tokens=12, temperature=0,
                                         ignore_eos=True))
    assert plain.finish_reason == "length" and plain.text
    assert "".join(pieces) == plain.text


def test_usage_is_what_vllm_counted(fleet: ChatFleet) -> None:
    with fleet.client("usage", **QUIET) as client:
        warm_up(client)
        for call in (lambda: client.chat(MODEL, HI, max_tokens=8, ignore_eos=True),
                     lambda: client.complete(MODEL, "Once upon a time", max_tokens=8,
                                             ignore_eos=True)):
            before = scrape_all(fleet.addresses)
            result = call()
            after = scrape_all(fleet.addresses)
            prompt = delta(before, after, "vllm:prompt_tokens_total")
            generated = delta(before, after, "vllm:generation_tokens_total")
            other = next(a for a in fleet.addresses if a != result.server)
            assert result.usage["completion_tokens"] == 8 == generated[result.server]
            assert result.usage["prompt_tokens"] == prompt[result.server] > 0
            assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + 8
            assert prompt[other] == generated[other] == 0


def report_argv(fleet: ChatFleet, *args: str) -> list[str]:
    """`modelfleet report --json` as a user runs it, on the fleet file the launcher used."""
    return [sys.executable, "-m", "modelfleet", "report", "--json", "-c",
            str(fleet.launched.config), *args]


def run_report(fleet: ChatFleet, *args: str) -> dict:
    done = subprocess.run(report_argv(fleet, *args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_status_and_report_show_the_queue_vllm_reports(fleet: ChatFleet) -> None:
    """Load one replica past its batch (128 on CPU) from outside the client, then look."""
    busy, idle = fleet.addresses
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 400,
                       "ignore_eos": True}).encode()

    def one() -> None:
        req = urllib.request.Request(f"http://{busy}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()

    load = [threading.Thread(target=one, daemon=True) for _ in range(160)]
    for t in load:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while metric_value(scrape(busy), "vllm:num_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the load never queued on the busy replica"
            time.sleep(0.1)
        # Both at once: each reads /metrics first, then waits for its probe request to get
        # through the queue (by then the load is over).
        reporting = subprocess.Popen(report_argv(fleet, "--timeout", "60"),
                                     stdout=subprocess.PIPE, text=True)
        with fleet.client("status", stall_timeout_s=60, **QUIET) as client:
            status = {s.address: s for s in client.status(probe=True)[MODEL].servers}
        out, _ = reporting.communicate(timeout=120)
        report = {row["server"]: row for row in json.loads(out)["servers"]}
    finally:
        for t in load:
            t.join(timeout=120)
    assert status[busy].queue_running >= 64 and status[busy].queue_waiting >= 1, status[busy]
    # on the idle one at most the two probes' own requests run
    assert status[idle].queue_waiting == 0 and status[idle].queue_running <= 2, status[idle]
    # read a moment later (a process start), so some of the first batch may have finished
    assert report[busy]["running"] >= 1 and report[busy]["status"] != "down", report[busy]
    assert report[idle]["running"] == 0 == report[idle]["waiting"], report[idle]


def test_report_lists_both_replicas_with_their_measurements(fleet: ChatFleet) -> None:
    report = run_report(fleet)
    rows = {row["server"]: row for row in report["servers"]}
    assert sorted(rows) == sorted(fleet.addresses) and report["ok"] is True
    for row in rows.values():
        # "degraded" is the report's fair call when one 8-token probe happened to be slow
        assert row["model"] == MODEL and row["status"] != "down" and row["healthy"] is True, row
        assert 0 < row["ttft_s"] <= row["latency_s"] and row["tokens_per_s"] > 0, row
        assert row["running"] == 0 == row["waiting"], row
    assert sum(row["picked"] for row in rows.values()) == 1
    assert report["models"][MODEL]["healthy"] == 2


def test_a_prompt_over_max_model_len_is_rejected_once(fleet: ChatFleet) -> None:
    captured = json.loads((FIXTURES / "error-prompt-too-long.txt").read_text().splitlines()[0])
    errors = {"handler": "/v1/completions", "status": "4xx"}
    with fleet.client("reject", **QUIET) as client:
        warm_up(client)
        before = scrape_all(fleet.addresses)
        with pytest.raises(RequestRejected) as caught:
            client.complete(MODEL, "hello world " * 400, max_tokens=4)
        after = scrape_all(fleet.addresses)
    assert caught.value.status == 400
    assert caught.value.message == captured["error"]["message"]
    tried = delta(before, after, "http_requests_total", errors)
    assert tried == {a: float(a == caught.value.server) for a in fleet.addresses}


def test_the_gateway_serves_the_replicas_to_the_openai_client(fleet: ChatFleet) -> None:
    """`modelfleet gateway` in front of the real replicas: the official openai client gets
    whole answers, streams and completions, vLLM's own 400 passes through with its message,
    and the gateway's /metrics counts what it relayed, under modelfleet_* names only."""
    config = write_fleet_file(fleet.work / "gateway.yaml", fleet.models, QUIET)
    gw = GatewayProcess(config, free_port(), log_path=fleet.work / "gateway.log").spawn()
    try:
        gw.wait_ready(timeout=120)
        oa = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = oa.chat.completions.create(model=MODEL, messages=HI, max_tokens=8)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        chunks = list(oa.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=8, stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert oa.completions.create(model=MODEL, prompt="Hello", max_tokens=4).choices[0].text
        captured = json.loads((FIXTURES / "error-prompt-too-long.txt").read_text().splitlines()[0])
        with pytest.raises(openai.BadRequestError) as caught:
            oa.completions.create(model=MODEL, prompt="hello world " * 400, max_tokens=4)
        assert caught.value.status_code == 400
        assert caught.value.body["message"] == captured["error"]["message"]
        # A stream is counted at its end, just after its last bytes reach the client.
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{gw.url}/metrics", timeout=30) as r:
                metrics = r.read().decode()
            ok = metric_value(metrics, "modelfleet_requests_total",
                              {"model": MODEL, "outcome": "ok"})
            if ok == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ok == 3, metrics
        assert not [line for line in metrics.splitlines() if line.startswith("vllm:")]
    finally:
        assert gw.stop() == 0, gw.output()


def test_a_stream_outlives_the_replica_killed_under_it(fleet: ChatFleet) -> None:
    """SIGKILL the replica serving a stream mid-answer: the caller's stream goes on on the
    other replica (vLLM's `continue_final_message`), as one stream, with no error and the
    tokens asked for. The launcher restarts the killed replica; the test waits for it (the
    kill test below needs both)."""
    with fleet.client("continue", **QUIET) as client:
        warm_up(client)
        prompt_tokens = client.chat(MODEL, HI, max_tokens=1).usage["prompt_tokens"]
        stream = client.chat_stream(MODEL, HI, max_tokens=300, ignore_eos=True, temperature=0)
        pieces: list[str] = []
        victim, old_pid = None, None
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 5:  # a few tokens in; hundreds to go
                victim = stream.server
                old_pid = fleet.launched.servers()[victim]
                os.kill(old_pid, signal.SIGKILL)
        assert victim is not None and old_pid is not None
        survivor = next(a for a in fleet.addresses if a != victim)
        assert stream.server == survivor and stream.continuations == 1
        assert "".join(pieces) == stream.text and len(pieces) > 5
        assert stream.finish_reason == "length"
        assert stream.usage["completion_tokens"] == 300, stream.usage  # one token a delta
        # the continuation's prompt held the answer so far, re-tokenized: about the same count
        assert abs(stream.usage["prompt_tokens"] - prompt_tokens) <= 2, stream.usage
    fleet.launched.wait_running(not_pids=frozenset({old_pid}))


def test_a_killed_replica_costs_callers_nothing_and_comes_back(fleet: ChatFleet) -> None:
    """SIGKILL a replica under a long request, keep light traffic going, wait for the restart.

    Light traffic on purpose: at full speed the survivor's engine takes both cores and the
    restart (Python imports, mostly) takes three times as long.
    """
    answered: list[tuple[float, str]] = []
    failed: list[BaseException] = []
    long_result = []
    stop = threading.Event()

    def caller(client: ModelServer) -> None:
        for n in range(2_000):  # bounded; paced to ~4 requests/s
            if stop.wait(0.25):
                return
            try:
                if n % 2:
                    r = client.chat(MODEL, HI, max_tokens=4)
                else:
                    r = client.complete(MODEL, "Once upon", max_tokens=4)
                answered.append((time.time(), r.server))
            except BaseException as exc:  # every caller error counts against the client
                failed.append(exc)

    def long_request(client: ModelServer) -> None:
        try:
            long_result.append(client.complete(MODEL, "Once upon", max_tokens=480,
                                               ignore_eos=True))
        except BaseException as exc:
            failed.append(exc)

    def wait_for(what: str, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert not failed, failed
            time.sleep(0.02)

    with fleet.client("kill", policy="round_robin", probe_interval_s=0.5) as client:
        survivor = client.complete(MODEL, "Once upon", max_tokens=1).server
        victim = next(a for a in fleet.addresses if a != survivor)  # round robin's next pick
        old_pid = fleet.launched.servers()[victim]
        threads = [threading.Thread(target=long_request, args=(client,))]
        threads[0].start()
        try:
            wait_for("the long request running on the victim",
                     lambda: metric_value(scrape(victim), "vllm:num_requests_running") >= 1, 30)
            os.kill(old_pid, signal.SIGKILL)  # the engine dies as a crash or the OOM killer would
            killed_at = time.time()
            threads += [threading.Thread(target=caller, args=(client,)) for _ in range(2)]
            for t in threads[1:]:
                t.start()
            new_pid = fleet.launched.wait_running(not_pids=frozenset({old_pid}))[victim]
            reborn_at = psutil.Process(new_pid).create_time()  # it answers nothing before this
            print(f"replica restarted by the launcher {reborn_at - killed_at:.1f}s after the "
                  f"kill, RUNNING {time.time() - killed_at:.1f}s after it")
            wait_for("traffic back on the restarted replica",
                     lambda: any(t > reborn_at and s == victim for t, s in answered), 60)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    assert failed == []
    (retried,) = long_result  # the request the victim died under, done again elsewhere
    assert retried.server == survivor and retried.usage["completion_tokens"] == 480
    during = [s for t, s in answered if t < reborn_at]
    assert during and set(during) == {survivor}

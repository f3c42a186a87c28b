"""The client API against live sims: results, streams, embeddings, threads, fork, close."""

from __future__ import annotations

import array
import asyncio
import gc
import json
import multiprocessing
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from client_fleet import MESSAGES, fleet, poll, start_sims

from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.config import FleetConfig
from modelfleet.errors import UnknownModel, UsageError
from modelfleet.routing import Health

ROOT = Path(__file__).resolve().parent.parent


def _sim_floats(sim, inputs: list[str]) -> list[list[float]]:
    """The sim's own float answer, asked for directly (the reference for base64)."""
    body = json.dumps({"model": sim.model, "input": inputs, "encoding_format": "float"}).encode()
    request = urllib.request.Request(f"{sim.url}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data = json.loads(response.read())["data"]
    return [array.array("f", d["embedding"]).tolist() for d in sorted(data, key=lambda d: d["index"])]


def _two_models(chat_sims, embed_sims) -> FleetConfig:
    chat, embed = fleet(chat_sims), fleet(embed_sims, model="e", kind="embedding")
    return FleetConfig(models={**chat.models, **embed.models}, routing=chat.routing)


async def test_chat_complete_and_stream_results(start_sim) -> None:
    sims = start_sims(start_sim, 2, speed=50)
    async with AsyncModelServer(config=fleet(sims)) as client:
        result = await client.chat("M", MESSAGES, max_tokens=7, temperature=0.2)  # an alias
        assert result.text and result.usage["completion_tokens"] == 7
        assert result.server in {s.address for s in sims}
        assert 0 < result.ttft_s <= result.latency_s < 10
        assert result.finish_reason == "length" and result.model == "m"
        done = await client.complete("m", "Once upon a time", max_tokens=3)
        assert done.text and done.usage["completion_tokens"] == 3
        stream = client.chat_stream("m", MESSAGES, max_tokens=5)
        assert stream.server is None  # nothing sent before the first iteration
        pieces = [p async for p in stream]
        assert len(pieces) == 5 and all(pieces)
        assert stream.server in {s.address for s in sims} and stream.text == "".join(pieces)
        assert stream.usage["completion_tokens"] == 5 and stream.finish_reason == "length"
        async with client.chat_stream("m", MESSAGES, max_tokens=50) as stream:
            async for _ in stream:
                break  # leaving the block closes it
        assert client.available_models() == ["m"]
        with pytest.raises(UnknownModel) as caught:
            await client.chat("llama-70b", MESSAGES)
        assert "known models: m" in str(caught.value)


async def test_whole_and_streamed_answers_are_identical(start_sim) -> None:
    # chat() with max_tokens asks for the whole answer in one piece; without it, and
    # chat_stream(), stream. The caller must not be able to tell them apart.
    sim = start_sim(speed=50)
    async with AsyncModelServer(config=fleet([sim])) as client:
        for limit in ({"max_tokens": 9}, {"max_tokens": 200}, {}):
            whole = await client.chat("m", MESSAGES, **limit)
            stream = client.chat_stream("m", MESSAGES, **limit)
            text = "".join([piece async for piece in stream])
            assert whole.text == text == stream.text and whole.text, limit
            assert dict(whole.usage) == dict(stream.usage), limit
            assert whole.finish_reason == stream.finish_reason, limit
            # A whole answer has every token at once; a streamed one saw its first earlier.
            if limit:
                assert 0 < whole.ttft_s == whole.latency_s, limit
            else:
                assert 0 < whole.ttft_s < whole.latency_s
        done = await client.complete("m", "Once upon a time", max_tokens=5)
        streamed = await client.complete("m", "Once upon a time")  # streamed underneath
        assert done.text and streamed.text.startswith(done.text)
        assert done.usage["completion_tokens"] == 5 and done.finish_reason == "length"


def test_sync_results_and_kind_mistakes(start_sim) -> None:
    chat, embed = start_sim(speed=50), start_sim(model="e", kind="embedding", speed=50, dim=8)
    with ModelServer(config=_two_models([chat], [embed])) as client:
        result = client.chat("m", MESSAGES, max_tokens=4)
        assert result.server == chat.address and result.usage["completion_tokens"] == 4
        stream = client.chat_stream("m", MESSAGES, max_tokens=4)
        assert "".join(stream) and stream.server == chat.address
        assert stream.usage["completion_tokens"] == 4
        assert len(client.embed("e", ["x"])[0]) == 8
        with pytest.raises(UsageError, match="embedding model; use embed"):
            client.chat("e", MESSAGES)
        with pytest.raises(UsageError, match="chat model"):
            client.embed("m", ["x"])
        assert sorted(client.available_models()) == ["e", "m"]


@pytest.mark.parametrize("count", [1, 256, 300])
def test_embeddings_match_the_sims_floats_in_order(start_sim, count: int) -> None:
    sims = start_sims(start_sim, 2, model="e", kind="embedding", speed=200, dim=16)
    inputs = [f"input number {i}" for i in range(count)]
    with ModelServer(config=fleet(sims, model="e", kind="embedding")) as client:
        vectors = client.embed("e", inputs)
        detail = client.embed_result("e", inputs)
        matrix = client.embed("e", inputs, as_numpy=True)
    expected = _sim_floats(sims[0], inputs)
    assert vectors == expected
    assert detail.vectors == expected and len(detail.servers) == (count + 255) // 256
    assert detail.usage["prompt_tokens"] > 0
    assert matrix.shape == (count, 16) and matrix.tolist() == expected


def test_one_client_from_sixteen_threads(start_sim) -> None:
    sims = start_sims(start_sim, 2, speed=50)
    with ModelServer(config=fleet(sims)) as client:
        def ask(i: int) -> tuple[int, int, str]:
            if i % 4 == 3:
                return i, 3, "".join(client.chat_stream("m", MESSAGES, max_tokens=3))
            r = client.chat("m", MESSAGES, max_tokens=1 + i % 5)
            return i, r.usage["completion_tokens"], r.text

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(96)))
    for i, tokens, text in answers:
        assert text
        assert tokens == (3 if i % 4 == 3 else 1 + i % 5)


_FORKED: ModelServer | None = None  # what a forked multiprocessing worker inherits


def _ask_in_child(i: int) -> tuple[int, str, int]:
    assert _FORKED is not None
    r = _FORKED.chat("m", MESSAGES, max_tokens=2 + i % 3)
    return i, r.text, r.usage["completion_tokens"]


def test_a_forked_child_keeps_working(start_sim) -> None:
    global _FORKED
    sims = start_sims(start_sim, 2, speed=50)
    with ModelServer(config=fleet(sims)) as client:
        client.chat("m", MESSAGES, max_tokens=2)  # the parent's loop thread is running
        _FORKED = client
        try:
            with multiprocessing.get_context("fork").Pool(2) as workers:
                answers = workers.map_async(_ask_in_child, range(6)).get(timeout=60)
        finally:
            _FORKED = None
        assert client.chat("m", MESSAGES, max_tokens=2).text  # the parent still works
    for i, text, tokens in answers:
        assert text and tokens == 2 + i % 3


async def test_breaking_out_of_a_stream_frees_the_servers_slot(start_sim) -> None:
    sim = start_sim(speed=20)
    async with AsyncModelServer(config=fleet([sim])) as client:
        await client.chat("m", MESSAGES, max_tokens=2)
        running_during = 0.0
        async for _ in client.chat_stream("m", MESSAGES, max_tokens=2000):
            running_during = await asyncio.to_thread(sim.metric, "vllm:num_requests_running")
            break
        assert running_during == 1
        for _ in range(500):
            if await asyncio.to_thread(sim.metric, "vllm:num_requests_running") == 0:
                break
            await asyncio.sleep(0.02)
        assert sim.metric("vllm:num_requests_running") == 0
        assert (await client.status())["m"].servers[0].in_flight == 0


def test_breaking_out_of_a_sync_stream_frees_the_servers_slot(start_sim) -> None:
    sim = start_sim(speed=20)
    with ModelServer(config=fleet([sim])) as client:
        running_during = 0.0
        for _ in client.chat_stream("m", MESSAGES, max_tokens=2000):
            running_during = sim.metric("vllm:num_requests_running")
            break
        assert running_during == 1
        poll(lambda: sim.metric("vllm:num_requests_running") == 0, what="running back to 0")
        poll(lambda: client.status()["m"].servers[0].in_flight == 0, what="in flight back to 0")


async def test_closing_leaves_no_task_and_no_thread(start_sim) -> None:
    sims = start_sims(start_sim, 2, speed=50)
    threads_before = set(threading.enumerate())
    client = AsyncModelServer(config=fleet(sims, probe_interval_s=0.05))
    await client.chat("m", MESSAGES, max_tokens=2)
    assert len(asyncio.all_tasks()) > 1  # the probe loop runs
    await client.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(UsageError, match="closed"):
        await client.chat("m", MESSAGES)

    sync = ModelServer(config=fleet(sims, probe_interval_s=0.05))
    sync.chat("m", MESSAGES, max_tokens=2)
    assert any(t.name.startswith("modelfleet-client") for t in threading.enumerate())
    sync.close()
    assert set(threading.enumerate()) <= threads_before
    sync.close()  # twice is fine


def test_a_client_dropped_without_close_stops_its_thread(start_sim) -> None:
    sim = start_sim(speed=50)
    client = ModelServer(config=fleet([sim], probe_interval_s=0.05))
    client.chat("m", MESSAGES, max_tokens=2)
    name = f"modelfleet-client-{id(client):x}"
    threads = [t for t in threading.enumerate() if t.name == name]
    assert len(threads) == 1
    del client
    gc.collect()
    poll(lambda: not threads[0].is_alive(), what="the dropped client's loop thread to end")


async def test_probes_keep_estimates_and_queues_fresh(start_sim) -> None:
    sims = start_sims(start_sim, 2, speed=50)
    async with AsyncModelServer(config=fleet(sims, probe_interval_s=0.05)) as client:
        await client.chat("m", MESSAGES, max_tokens=2)
        def served() -> list[float]:
            return [s.metric("http_requests_total") for s in sims]

        requests = served()
        for _ in range(200):  # probes run with no request from the caller
            now = await asyncio.to_thread(served)
            if all(n > r + 2 for n, r in zip(now, requests, strict=True)):
                break
            await asyncio.sleep(0.02)
        status = (await client.status())["m"]
    assert all(s.metric("http_requests_total") > r + 2 for s, r in zip(sims, requests, strict=True))
    for server in status.servers:
        assert server.health is Health.UP and server.queue_running == 0
        assert server.expected_latency_s is not None and server.requests >= 2


async def test_a_down_server_comes_back_through_probes(start_sim) -> None:
    sim = start_sim(speed=50)
    other = start_sim(speed=50)
    async with AsyncModelServer(config=fleet([sim, other], probe_interval_s=0.05)) as client:
        await asyncio.to_thread(sim.fault, error_rate=1.0, error_status=404)  # another model
        for _ in range(6):
            assert (await client.chat("m", MESSAGES, max_tokens=2)).server == other.address
        status = {s.address: s for s in (await client.status())["m"].servers}
        assert status[sim.address].health is Health.DOWN
        assert "404" in (status[sim.address].reason or "")
        await asyncio.to_thread(sim.fault, reset=True)
        for _ in range(500):
            status = {s.address: s for s in (await client.status())["m"].servers}
            if status[sim.address].health is Health.UP:
                break
            await asyncio.sleep(0.02)
        assert status[sim.address].health is Health.UP


def test_reload_adds_new_servers_and_drains_removed_ones(start_sim, tmp_path: Path) -> None:
    old, new = start_sim(speed=50), start_sim(speed=50)
    path = tmp_path / "fleet.yaml"

    def write(server) -> None:
        path.write_text("routing:\n  probe_interval_s: 60\nmodels:\n  m:\n    backend: sim\n"
                        f"    servers:\n      - {{host: 127.0.0.1, port: {server.port}}}\n")

    write(old)
    with ModelServer(path) as client:
        assert client.chat("m", MESSAGES, max_tokens=2).server == old.address
        write(new)
        client.reload()
        servers = {client.chat("m", MESSAGES, max_tokens=2).server for _ in range(5)}
        assert servers == {new.address}
        assert [s.address for s in client.status()["m"].servers] == [new.address]
    with ModelServer(config=fleet([old])) as client, pytest.raises(UsageError, match="reload"):
        client.reload()


def test_the_original_entry_points(start_sim) -> None:
    chat = start_sims(start_sim, 2, speed=50)
    embed = start_sim(model="e", kind="embedding", speed=50, dim=8)
    with ModelServer(config=_two_models(chat, [embed])) as client:
        assert isinstance(client.get_completion_or_embedding("m", "hello"), str)
        assert client.get_completion_or_embedding("M", MESSAGES, max_tokens=2)
        vector = client.get_completion_or_embedding("e", "hello")
        assert len(vector) == 8 and isinstance(vector[0], float)
        assert len(client.get_completion_or_embedding("e", ["a", "b"])) == 2
        assert client.get_fastest_server("m") in {s.address for s in chat}
        latency = client.get_all_latency()
        assert set(latency) == {"m", "e"}
        assert all(v is not None and v > 0 for servers in latency.values() for v in servers.values())
        assert client.get_running_server_sizes() == {"m": 2, "e": 1}
        chat[0].kill()
        assert client.get_running_server_sizes() == {"m": 1, "e": 1}


def test_api_key_goes_to_the_server_and_nowhere_else(start_sim) -> None:
    sim = start_sim(speed=50, api_key="top-secret-key")
    with ModelServer(config=fleet([sim], api_key="top-secret-key")) as client:
        assert client.chat("m", MESSAGES, max_tokens=2).text
        assert "top-secret-key" not in repr(client.config) + repr(client.status())
    with ModelServer(config=fleet([sim], api_key="wrong-key")) as client:
        with pytest.raises(Exception) as caught:
            client.chat("m", MESSAGES, max_tokens=2)
    assert "401" in str(caught.value) and "wrong-key" not in str(caught.value)


def test_model_server_script_asks_every_model(start_sim, tmp_path: Path) -> None:
    chat, embed = start_sim(speed=50), start_sim(model="e", kind="embedding", speed=50, dim=8)
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n"
                    f"  m:\n    backend: sim\n    servers: [{{host: 127.0.0.1, port: {chat.port}}}]\n"
                    f"  e:\n    kind: embedding\n    backend: sim\n"
                    f"    servers: [{{host: 127.0.0.1, port: {embed.port}}}]\n")
    done = subprocess.run([sys.executable, "model_server.py", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("m ") and chat.address in line and " ms" in line for line in lines)
    assert any(line.startswith("e ") and embed.address in line and "8-dim" in line
               for line in lines)
    missing = subprocess.run([sys.executable, "model_server.py", "-c", str(tmp_path / "nope.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_an_async_client_outlives_its_first_event_loop(start_sim) -> None:
    sim = start_sim(speed=50)
    client = AsyncModelServer(config=fleet([sim], probe_interval_s=0.05))
    assert asyncio.run(client.chat("m", MESSAGES, max_tokens=2)).text
    assert asyncio.run(client.chat("m", MESSAGES, max_tokens=2)).text  # a new loop: starts over

    async def from_another_live_loop() -> None:
        await client.chat("m", MESSAGES, max_tokens=2)

    async def main() -> None:
        await client.chat("m", MESSAGES, max_tokens=2)
        other = await asyncio.to_thread(lambda: _raises(lambda: asyncio.run(from_another_live_loop())))
        assert isinstance(other, UsageError) and "event loop" in str(other)
        await client.close()

    asyncio.run(main())


def _raises(call) -> BaseException | None:
    try:
        call()
    except BaseException as exc:  # handed back to the test to inspect
        return exc
    return None

"""modelfleet_* metrics on a live /metrics: what the dashboard asks for, right counts, no
secrets, no engine names; and nothing at all without a registry (live sims)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap

import pytest
from client_fleet import MESSAGES, fleet, start_sims
from helpers import ROOT, free_port, http_text, metric_value
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from modelfleet import serve_metrics
from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.config import FleetConfig, ModelSpec, RoutingSpec, ServerSpec
from modelfleet.errors import NoServerAvailable, RequestRejected, StreamInterrupted

DASHBOARD = ROOT / "deploy" / "grafana" / "modelfleet.json"
KEY = "sk-test-0123456789abcdef-never-shown"
LONG = [{"role": "user", "content": "Tell me about the sea, and the harbour, at length. " * 40}]


def dashboard_series() -> set[str]:
    """Every series name a query of the dashboard (panels and variables) names."""
    text = json.dumps(json.loads(DASHBOARD.read_text()))
    names = set(re.findall(r"\bmodelfleet_[a-z0-9_]+", text))
    assert len(names) >= 10, names  # the dashboard was read, not an empty file
    return names


def sample_names(exposition: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in exposition.splitlines() if line and not line.startswith("#")}


def two_model_fleet(chat_sims, embed_sim, **routing) -> FleetConfig:
    chat = ModelSpec(name="m", backend="sim", api_key=KEY,
                     servers=tuple(ServerSpec(s.host, s.port) for s in chat_sims))
    embed = ModelSpec(name="e", kind="embedding", backend="sim", api_key=KEY,
                      servers=(ServerSpec(embed_sim.host, embed_sim.port),))
    return FleetConfig(models={"m": chat, "e": embed}, routing=RoutingSpec(**routing))


async def test_live_metrics_have_every_dashboard_series_and_no_secret(start_sim) -> None:
    chat_sims = start_sims(start_sim, 2, model="m", api_key=KEY, kv_cache_tokens=65536)
    embed_sim = start_sim(model="e", kind="embedding", api_key=KEY)
    config = two_model_fleet(chat_sims, embed_sim, probe_interval_s=0.2)
    registry = CollectorRegistry()
    n = 0
    async with AsyncModelServer(config=config, metrics=registry) as client:
        for _ in range(3):
            await client.chat("m", LONG, max_tokens=4)  # whole answer
            await client.chat("m", MESSAGES)  # streamed underneath: its TTFT is known
            await client.complete("m", "Once upon a time", max_tokens=4)
            pieces = [p async for p in client.chat_stream("m", MESSAGES, max_tokens=4)]
            assert pieces
            await client.embed("e", ["one", "two"])
            n += 5
        with serve_metrics(registry, free_port()) as server:
            assert server.url.startswith("http://127.0.0.1:")

            # The hit ratio needs two probes of each server: scrape (off the loop, which
            # runs the probes) until it is there.
            for _ in range(200):
                text = await asyncio.to_thread(http_text, server.url)
                if text.count("modelfleet_server_prefix_cache_hit_ratio{") == 2:
                    break
                await asyncio.sleep(0.1)
    names = sample_names(text)
    missing = sorted(name for name in dashboard_series() if name not in names)
    assert not missing, f"the dashboard asks for series /metrics does not have: {missing}"
    assert metric_value(text, "modelfleet_requests_total") == n
    assert metric_value(text, "modelfleet_requests_total", {"outcome": "ok"}) == n
    assert metric_value(text, "modelfleet_requests_total", {"model": "e"}) == 3
    assert metric_value(text, "modelfleet_request_duration_seconds_count") == n
    assert metric_value(text, "modelfleet_request_attempts_count") == n
    # streams, and answers streamed underneath; not whole answers nor embeddings
    assert metric_value(text, "modelfleet_time_to_first_token_seconds_count") == 6
    servers = {s.address for s in chat_sims}
    for address in servers:
        assert metric_value(text, "modelfleet_server_usable", {"server": address}) == 1
        assert metric_value(text, "modelfleet_server_state",
                            {"server": address, "state": "up"}) == 1
        ratio = metric_value(text, "modelfleet_server_prefix_cache_hit_ratio", {"server": address})
        assert 0 <= ratio <= 1
    assert set(re.findall(r'modelfleet_server_usable\{model="m",server="([^"]+)"', text)) == servers
    assert not any(name.startswith("vllm:") for name in names)
    assert KEY not in text and "Bearer" not in text
    assert all(name.startswith("modelfleet_") for name in names
               if not name.startswith(("python_", "process_")))


async def test_outcomes_retries_and_attempts_are_counted(start_sim) -> None:
    a, b = start_sims(start_sim, 2)
    registry = CollectorRegistry()
    config = fleet([a, b], policy="round_robin", max_retry=5)

    def value(name: str, **labels: str) -> float:
        return metric_value(generate_latest(registry).decode(), name, labels)

    async with AsyncModelServer(config=config, metrics=registry) as client:
        await client.chat("m", MESSAGES, max_tokens=4)  # measured: both look up
        a.kill()
        for _ in range(6):  # round robin: some go to the dead server first, and move on
            result = await client.chat("m", MESSAGES, max_tokens=4)
            assert result.server == b.address
        retries = value("modelfleet_retries_total")
        assert retries >= 1 and retries == value("modelfleet_retries_total", reason="refused")
        assert value("modelfleet_requests_total", outcome="ok") == 7
        assert value("modelfleet_request_attempts_sum") == 7 + retries
        assert value("modelfleet_request_attempts_count") == 7

        with pytest.raises(RequestRejected):
            await client.chat("m", MESSAGES, max_tokens=-5)
        assert value("modelfleet_requests_total", outcome="rejected", server=b.address) == 1

        stream = client.chat_stream("m", MESSAGES, max_tokens=50)
        async for _ in stream:
            break
        await stream.aclose()
        assert value("modelfleet_requests_total", outcome="cancelled") == 1

        slow = client.chat_stream("m", MESSAGES, max_tokens=2000)  # minutes at 50 tokens/s
        with pytest.raises(StreamInterrupted):
            async for _ in slow:
                if b.alive:
                    b.kill()
        assert value("modelfleet_requests_total", outcome="interrupted", server=b.address) == 1

        with pytest.raises(NoServerAvailable):
            await client.chat("m", MESSAGES, max_tokens=4)
        assert value("modelfleet_requests_total", outcome="unavailable") == 1
        assert value("modelfleet_requests_total") == 7 + 4
        assert value("modelfleet_request_duration_seconds_count") == 7  # successes only
        assert value("modelfleet_server_usable", server=a.address) == 0
        assert value("modelfleet_server_state", server=a.address, state="down") == 1


def test_the_sync_client_hands_its_registry_over(start_sim) -> None:
    sim = start_sim()
    registry = CollectorRegistry()
    with ModelServer(config=fleet([sim]), metrics=registry) as client:
        for _ in range(3):
            client.chat("m", MESSAGES, max_tokens=4)
        assert "".join(client.chat_stream("m", MESSAGES, max_tokens=4))
    text = generate_latest(registry).decode()
    assert metric_value(text, "modelfleet_requests_total", {"server": sim.address}) == 4


async def test_two_clients_may_share_one_registry(start_sim) -> None:
    sim = start_sim()
    registry = CollectorRegistry()
    async with AsyncModelServer(config=fleet([sim]), metrics=registry) as one, \
            AsyncModelServer(config=fleet([sim]), metrics=registry) as two:
        await asyncio.gather(one.chat("m", MESSAGES, max_tokens=4),
                             two.chat("m", MESSAGES, max_tokens=4))
        text = generate_latest(registry).decode()
    assert metric_value(text, "modelfleet_requests_total") == 2
    assert text.count("modelfleet_server_usable{") == 1  # one (model, server), shown once
    assert "modelfleet_server_usable{" not in generate_latest(registry).decode()  # closed


async def test_without_a_registry_nothing_is_recorded(start_sim) -> None:
    sim = start_sim()
    async with AsyncModelServer(config=fleet([sim])) as client:
        await client.chat("m", MESSAGES, max_tokens=4)
        assert all(route.metrics is None for route in client._routes.values())
    assert b"modelfleet_" not in generate_latest(REGISTRY)
    # In a fresh interpreter, requests of every kind never even import prometheus_client.
    script = textwrap.dedent(f"""
        import asyncio, sys
        from modelfleet.client import AsyncModelServer, ModelServer
        from modelfleet.config import FleetConfig, ModelSpec, ServerSpec
        spec = ModelSpec(name="m", backend="sim", servers=(ServerSpec("{sim.host}", {sim.port}),))
        config = FleetConfig(models={{"m": spec}})
        async def main():
            async with AsyncModelServer(config=config) as client:
                await client.chat("m", [{{"role": "user", "content": "hi"}}], max_tokens=4)
                assert [p async for p in client.chat_stream("m", [{{"role": "user", "content": "hi"}}])]
        asyncio.run(main())
        with ModelServer(config=config) as client:
            client.chat("m", [{{"role": "user", "content": "hi"}}])
        assert "prometheus_client" not in sys.modules, "imported without a registry"
        assert "modelfleet.metrics" not in sys.modules
        print("clean")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr

"""Servers found through DNS (`discover: {dns: ...}`), against a real DNS server on 127.0.0.1.

The DNS server is `modelfleet.testing_dns.LocalDns` (dnslib: another implementation than
the client's dnspython), answering UDP on a free port; the sims listen on loopback
addresses of their own (127.0.0.2, .3, .4), all on ONE port, as the pods behind a
headless Service do, so only the A records tell them apart. Every wait polls for a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SimProcess, run_cli, write_fleet
from prometheus_client import CollectorRegistry, generate_latest

from modelfleet.client import AsyncModelServer, ModelServer
from modelfleet.client import discovered as discovered_module
from modelfleet.client.discovered import Discovery
from modelfleet.config import DiscoverSpec, FleetConfig, ModelSpec, RoutingSpec
from modelfleet.discovery import Snapshot, Source
from modelfleet.discovery.dns import DnsSource
from modelfleet.errors import NoServerAvailable
from modelfleet.testing import metric_value, running, shared_port
from modelfleet.testing_dns import LocalDns

NAME = "llama.fleet.test"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimProcess]]:
    """One sim per host of HOSTS, all on one port; by address."""
    port = shared_port(HOSTS)
    with running(SimProcess(port, "m", host=host, flags={"speed": 50, "seed": i})
                 for i, host in enumerate(HOSTS)) as started:
        assert all(sim.host in sim.address for sim in started)
        yield {sim.address: sim for sim in started}


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    with LocalDns() as server:
        yield server


@pytest.fixture(autouse=True)
def healthy_sims(request: pytest.FixtureRequest) -> Iterator[None]:
    """Faults set by a test end with it."""
    yield
    if "sims" in request.fixturenames:
        for sim in request.getfixturevalue("sims").values():
            sim.fault(reset=True)


def config(dns: LocalDns, port: int, **discover: Any) -> FleetConfig:
    spec = DiscoverSpec(dns=NAME, port=port, nameserver=dns.nameserver,
                        every_s=discover.pop("every_s", 0.2), **discover)
    return FleetConfig(models={"m": ModelSpec(name="m", backend="sim", discover=spec)},
                       routing=RoutingSpec(probe_interval_s=60.0))


def port_of(sims: dict[str, SimProcess]) -> int:
    return next(iter(sims.values())).port


async def until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


async def servers_of(client: AsyncModelServer, n: int) -> list[str]:
    """The servers that answered `n` chats, sent four at a time (any error fails the test)."""
    async def one() -> str:
        return (await client.chat("m", MESSAGES, max_tokens=4)).server
    out: list[str] = []
    for _ in range(0, n, 4):
        out += await asyncio.gather(*(one() for _ in range(4)))
    return out


# -- the source alone --------------------------------------------------------------------------

async def test_the_source_reads_a_aaaa_and_srv_records(dns: LocalDns) -> None:
    dns.set_addresses(NAME, ["127.0.0.2", "127.0.0.3", "::1"])
    source = DnsSource(DiscoverSpec(dns=NAME, port=8000, nameserver=dns.nameserver))
    servers, ttl = await source.lookup()
    assert servers == {("127.0.0.2", 8000), ("127.0.0.3", 8000), ("::1", 8000)} and ttl == 1

    # SRV: ports from the records; a target's address from the additional section, or
    # looked up when the answer left it out; a target with no address adds nothing.
    dns.set_addresses("a.fleet.test", ["127.0.0.4"])
    dns.set_srv("_http._tcp." + NAME, [("a.fleet.test", 8001), ("llama.fleet.test", 8002),
                                       ("nowhere.fleet.test", 8003)])
    srv = DnsSource(DiscoverSpec(dns_srv="_http._tcp." + NAME, nameserver=dns.nameserver))
    servers, _ = await srv.lookup()
    assert servers == {("127.0.0.4", 8001), ("127.0.0.2", 8002), ("127.0.0.3", 8002),
                       ("::1", 8002)}
    assert srv.describe() == f"dns srv _http._tcp.{NAME} via {dns.nameserver}"

    # No records (NXDOMAIN, or a name with none) is an empty answer, not a failure.
    dns.forget(NAME)
    assert await source.lookup() == (set(), None)
    dns.set_addresses(NAME, [])
    assert await source.lookup() == (set(), None)


async def test_the_records_ttl_brings_the_next_lookup_sooner(dns: LocalDns) -> None:
    dns.set_addresses(NAME, ["127.0.0.2"])
    source = DnsSource(DiscoverSpec(dns=NAME, port=8000, nameserver=dns.nameserver, every_s=60))
    assert source.delay(None) == 60 and source.delay(7) == 7 and source.delay(0) == 1
    snapshots = source.snapshots()
    try:
        first = await anext(snapshots)
        started = time.monotonic()
        second = await asyncio.wait_for(anext(snapshots), 10)  # TTL 1 s, not every_s 60 s
        assert time.monotonic() - started >= 0.9
        assert first.ready == second.ready == (("127.0.0.2", 8000),) and first.error is None
        dns.stop()
        failed = await asyncio.wait_for(anext(snapshots), 10)
        assert failed.error and failed.ready == () and failed.source == source.describe()
    finally:
        await snapshots.aclose()


# -- the client ---------------------------------------------------------------------------------

async def test_a_server_added_to_the_records_takes_traffic_only_after_its_probe(
        sims: dict[str, SimProcess], dns: LocalDns) -> None:
    a, b, c = sims
    dns.set_addresses(NAME, HOSTS[:2])
    registry = CollectorRegistry()
    async with AsyncModelServer(config=config(dns, port_of(sims)), metrics=registry) as client:
        assert set(await servers_of(client, 16)) == {a, b}
        discovery = client._route("m").discovery
        assert discovery is not None and discovery.description == \
            f"dns {NAME}:{port_of(sims)} via {dns.nameserver}"
        first_change = discovery.last_change

        sims[c].fault(error_rate=1.0)  # found, but failing its probe: no traffic yet
        dns.set_addresses(NAME, HOSTS)
        await until(lambda: c in discovery.probe_failures, what="the newcomer's probe failed")
        assert c not in await servers_of(client, 24)

        sims[c].fault(reset=True)  # its next probe succeeds: it joins and takes its share
        await until(lambda: c in client._route("m").servers, what="the newcomer joined")
        assert c in await servers_of(client, 48)
        assert discovery.last_change is not None and first_change is not None
        assert discovery.last_change > first_change and discovery.last_error is None

        text = generate_latest(registry).decode()
        assert metric_value(text, "modelfleet_discovery_servers", {"model": "m", "state": "ready"}) == 3
        assert metric_value(text, "modelfleet_discovery_servers",
                            {"model": "m", "state": "draining"}) == 0
        assert metric_value(text, "modelfleet_discovery_last_change_timestamp_seconds",
                            {"model": "m"}) == pytest.approx(discovery.last_change)
        assert metric_value(text, "modelfleet_discovery_errors_total", {"model": "m"}) == 0


async def test_a_server_removed_from_the_records_gets_no_new_requests_and_its_stream_finishes(
        sims: dict[str, SimProcess], dns: LocalDns) -> None:
    dns.set_addresses(NAME, HOSTS)
    async with AsyncModelServer(config=config(dns, port_of(sims))) as client:
        await servers_of(client, 4)
        await until(lambda: len(client._route("m").servers) == 3, what="all three joined")
        stream = client.chat_stream("m", MESSAGES, max_tokens=64)
        pieces = [await anext(stream)]  # the stream is open on one server; it stays in flight
        leaving = stream.server
        assert leaving in sims
        dns.set_addresses(NAME, [s.host for a, s in sims.items() if a != leaving])
        discovery = client._route("m").discovery
        assert discovery is not None
        await until(lambda: leaving not in client._route("m").servers, what="removed")
        assert discovery.draining() == [leaving]  # gone from the records, a request on it

        assert leaving not in await servers_of(client, 24)
        pieces += [piece async for piece in stream]  # the one in flight finishes there
        assert stream.finish_reason is not None and stream.server == leaving
        assert "".join(pieces) == stream.text and discovery.draining() == []


async def test_the_resolver_stopping_keeps_the_last_known_good_set(
        sims: dict[str, SimProcess], dns: LocalDns, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    a, b, _ = sims
    dns.set_addresses(NAME, HOSTS[:2])
    registry = CollectorRegistry()
    async with AsyncModelServer(config=config(dns, port_of(sims)), metrics=registry) as client:
        assert set(await servers_of(client, 16)) == {a, b}
        discovery = client._route("m").discovery
        assert discovery is not None
        with caplog.at_level(logging.WARNING, logger="modelfleet.client"):
            dns.stop()
            await until(lambda: discovery.errors >= 3, what="three failed lookups")
            assert set(await servers_of(client, 16)) == {a, b}
            assert discovery.last_error and "DNS" in discovery.last_error
            kept = [r for r in caplog.records if "keeping the last known-good set" in r.message]
            assert len(kept) == 1, "one warning per change of state, not one per lookup"
            assert "(2 servers)" in kept[0].message
            text = generate_latest(registry).decode()
            assert metric_value(text, "modelfleet_discovery_errors_total", {"model": "m"}) >= 3
            assert metric_value(text, "modelfleet_discovery_servers",
                                {"model": "m", "state": "ready"}) == 2

            # `modelfleet report` looks once: no answer, no servers, and it says why.
            fleet = write_fleet(tmp_path / "fleet.yaml", {"m": {
                "backend": "sim", "discover": {"dns": NAME, "port": port_of(sims),
                                               "nameserver": dns.nameserver}}})
            result = await asyncio.to_thread(run_cli, "report", "--json", "-c", str(fleet))
            assert result.returncode == 1, result.stderr
            body = json.loads(result.stdout)
            assert body["models"]["m"]["discovery"]["found"] == 0
            assert "timed out" in body["models"]["m"]["discovery"]["error"]
            assert body["models"]["m"]["discovery"]["source"] == discovery.description

            dns.start()  # the same port again: it recovers
            await until(lambda: discovery.last_error is None, what="recovered")
        assert any("works again" in r.message for r in caplog.records)
        result = await asyncio.to_thread(run_cli, "report", "-c", str(fleet))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"m: 2 servers from {discovery.description}" in result.stdout


async def test_an_empty_answer_keeps_the_last_known_good_set(
        sims: dict[str, SimProcess], dns: LocalDns) -> None:
    a, b, _ = sims
    dns.set_addresses(NAME, HOSTS[:2])
    async with AsyncModelServer(config=config(dns, port_of(sims))) as client:
        assert set(await servers_of(client, 16)) == {a, b}
        discovery = client._route("m").discovery
        assert discovery is not None
        dns.set_addresses(NAME, [])  # the name is there, with no records
        await until(lambda: discovery.last_error == "the answer named no ready server",
                    what="the empty answer seen")
        assert set(await servers_of(client, 16)) == {a, b}
        dns.forget(NAME)  # NXDOMAIN
        queries = dns.queries
        await until(lambda: dns.queries >= queries + 4, what="looked up again")
        assert set(client._route("m").servers) == {a, b}
        assert discovery.errors == 0  # no answer is not a failed lookup


async def test_a_request_waits_for_the_first_servers_then_says_which_source_failed(
        sims: dict[str, SimProcess], dns: LocalDns, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovered_module, "DISCOVERY_WAIT_S", 1.5)
    dns.stop()
    async with AsyncModelServer(config=config(dns, port_of(sims))) as client:
        started = time.monotonic()
        with pytest.raises(NoServerAvailable) as caught:
            await client.chat("m", MESSAGES, max_tokens=4)
        assert 1.0 < time.monotonic() - started < 10
        assert f"dns {NAME}:" in str(caught.value) and "timed out" in str(caught.value)
        assert "m" in client.models_without_server()

        dns.set_addresses(NAME, HOSTS[:1])
        dns.start()  # the next request waits for the servers, and gets one
        assert (await client.chat("m", MESSAGES, max_tokens=4)).server == f"{HOSTS[0]}:{port_of(sims)}"


def test_the_sync_client_finds_its_servers_too(sims: dict[str, SimProcess], dns: LocalDns) -> None:
    dns.set_addresses(NAME, HOSTS[1:])
    with ModelServer(config=config(dns, port_of(sims))) as client:
        served = {client.chat("m", MESSAGES, max_tokens=4).server for _ in range(16)}
    assert served == {f"{host}:{port_of(sims)}" for host in HOSTS[1:]}


# -- the seam: any Source's snapshots (what the Kubernetes source sends too) -------------------------

class ScriptedSource(Source):
    """Snapshots put in by the test, as a source would send them."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Snapshot] = asyncio.Queue()

    def describe(self) -> str:
        return "scripted"

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        while True:
            yield await self.queue.get()


async def test_draining_entries_leave_and_a_whole_set_replaced_keeps_serving(
        sims: dict[str, SimProcess]) -> None:
    a, b, c = sims
    pair = {address: (sim.host, sim.port) for address, sim in sims.items()}
    spec = DiscoverSpec(dns="unused.fleet.test", port=1)
    cfg = FleetConfig(models={"m": ModelSpec(name="m", backend="sim", discover=spec)},
                      routing=RoutingSpec(probe_interval_s=60.0))
    async with AsyncModelServer(config=cfg) as client:
        route = client._route("m")
        source = ScriptedSource()
        route.discovery = discovery = Discovery(route, source)
        source.queue.put_nowait(Snapshot(ready=(pair[a], pair[b])))
        assert set(await servers_of(client, 16)) == {a, b}

        # Serving but terminating: no new requests.
        source.queue.put_nowait(Snapshot(ready=(pair[a],), draining=(pair[b],)))
        await until(lambda: b not in route.servers, what="the draining one left the pool")
        assert discovery.draining() == [b]
        assert set(await servers_of(client, 16)) == {a}

        # Every server replaced at once, the newcomer not answering yet: the old one serves on.
        sims[c].fault(error_rate=1.0)
        source.queue.put_nowait(Snapshot(ready=(pair[c],)))
        await until(lambda: c in discovery.probe_failures, what="the newcomer's probe failed")
        assert set(await servers_of(client, 16)) == {a}
        sims[c].fault(reset=True)
        await until(lambda: c in route.servers and a not in route.servers, what="replaced")
        assert set(await servers_of(client, 16)) == {c}


# -- the fleet file -------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "words"), [
    ({"backend": "sim"}, "missing required key 'servers' (or 'discover'"),
    ({"servers": [{"host": "h", "port": 1}], "discover": {"dns": NAME, "port": 80}},
     "give only one of servers, discover"),
    ({"discover": {"dns": NAME}}, "give the servers' port with dns"),
    ({"discover": {"dns": NAME, "port": 70000}}, "must be 1..65535"),
    ({"discover": {"dns": "not a name", "port": 80}}, "must be a DNS name"),
    ({"discover": {"dns": NAME, "port": 80, "dns_srv": "_http._tcp.x"}}, "give only one of dns, dns_srv"),
    ({"discover": {"dns_srv": NAME}}, "must be an SRV name"),
    ({"discover": {"dns": NAME, "port": 80, "nameserver": "dns.local"}}, "must be an IP address"),
    ({"discover": {"dns": NAME, "port": 80, "wait": 3}}, "unknown key"),
    ({"discover": {"kubernetes": {"namespace": "ns", "service": "Llama", "port": 8000}}},
     "must be a Service name"),
    ({"discover": {"kubernetes": {"namespace": "ns", "service": "llama"}}},
     "missing required key 'port' (or 'port_name'"),
    ({"discover": {"kubernetes": {"namespace": "ns", "service": "llama", "port": 1,
                                  "port_name": "http"}}}, "give only one of port, port_name"),
    ({"discover": {"kubernetes": {"namespace": "ns", "service": "llama", "port": 1},
                   "every_s": 3}}, "goes with dns or dns_srv only"),
])
def test_config_validate_checks_discover(tmp_path: Path, model: dict, words: str) -> None:
    result = run_cli("config", "validate", "-c", str(write_fleet(tmp_path / "fleet.yaml", {"m": model})))
    assert result.returncode == 2, result.stdout
    assert words in result.stderr and "Traceback" not in result.stderr


def test_config_validate_and_show_take_a_discovered_model(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path / "fleet.yaml", {
        "m": {"discover": {"dns": NAME, "port": 8000, "nameserver": "127.0.0.1:5353"}},
        "k": {"discover": {"kubernetes": {"namespace": "fleet", "service": "llama",
                                          "port_name": "http"}}},
        "s": {"servers": [{"host": "127.0.0.1", "port": 8000}]}})
    result = run_cli("config", "validate", "-c", str(fleet))
    assert result.returncode == 0, result.stderr
    assert "3 models, 1 server (and 2 models whose servers are found through discover:)" in result.stdout
    shown = run_cli("config", "show", "-c", str(fleet)).stdout
    assert f"dns: {NAME}" in shown and "every_s: 5.0" in shown and "nameserver: 127.0.0.1:5353" in shown
    assert "service: llama" in shown and "port_name: http" in shown and "relist_s: 300.0" in shown

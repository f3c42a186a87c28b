"""`modelfleet report`: how every server of the fleet is doing, measured now.

It runs the client's own probe (`modelfleet.probe`: the tiny benchmark request
and a /metrics scrape) against every server of every model at once, so a
30-server fleet takes about one probe's time and a hung server costs at most
the timeout. The results are fed to the same routing `Pool` the client uses,
so the report's "would pick" marker is the routing code's own answer, not a
second opinion written here.

Status, per server:
- `down`: the probe got no answer (refused, timeout, HTTP 5xx, a 404/401 from a
  misconfigured server, ...); the reason says which;
- `degraded`: it answered, but more than `routing.latency_growing_rate` times
  slower than the fastest server of its model (the same ratio the client uses
  to call a server degraded), or it is alive but turning requests away (429/503);
- `up`: otherwise.

A model is healthy when at least one of its servers answered the probe; the
command exits 1 when some model is not, so it works as a readiness check.

A model with `discover:` has its servers found once, at the report's start (the
first Snapshot of its source, modelfleet/discovery/); its summary says where they
came from, when, and what went wrong if the lookup failed.

This module gathers the data; showing it (the table, the JSON line) is the CLI's
part, in `modelfleet/cli/report_view.py`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from modelfleet._transports.aiohttp import AiohttpTransport
from modelfleet._transports.models import CacheSample
from modelfleet.client.route import Route
from modelfleet.config import FleetConfig, ModelSpec, ServerSpec
from modelfleet.discovery import Snapshot, source_for
from modelfleet.probe import ProbeResult, apply_probe, benchmark_work, probe_server
from modelfleet.routing import Endpoint, Failure, Health, Pool

DEFAULT_TIMEOUT_S = 5.0
# Two probes of the same tiny request differ by a few milliseconds of scheduling
# noise; on a fast fleet (the simulator) that alone can be a 2x ratio, so a server
# must also be this much slower in absolute terms before it is called degraded.
NOISE_S = 0.010
_HTTP_STATUS = re.compile(r"HTTP (\d{3})")


@dataclass(frozen=True)
class ServerRow:
    """One server as the report shows it (times in seconds; None: not measured)."""

    model: str
    kind: str
    server: str  # host:port
    status: str  # up | degraded | down
    reason: str  # why not up: "refused: ...", "timeout: ...", "HTTP 500: ...", "4.1x slower than ..."
    detail: str  # the probe's own words, for scripts that want them (never a secret)
    healthy: bool  # it answered the probe
    latency_s: float | None  # the whole benchmark request
    ttft_s: float | None  # chat only
    tokens_per_s: float | None  # chat: output tokens / the whole request's seconds
    ms_per_input: float | None  # embeddings: milliseconds per input
    running: float | None  # the server's own queue, from /metrics
    waiting: float | None
    # Its prefix cache, from /metrics (vllm:prefix_cache_hits_total / _queries_total, in
    # tokens): hits / queries since it started, and since the previous round (--watch).
    prefix_hits: float | None
    prefix_queries: float | None
    prefix_hit_ratio: float | None
    prefix_hit_ratio_recent: float | None
    expected_latency_s: float | None  # what the routing expects of the benchmark request now
    picked: bool  # the server the routing policy would send the next request to


@dataclass(frozen=True)
class DiscoveryRow:
    """Where a model's servers were found (`discover:`), as the report's lookup saw them."""

    source: str  # "dns llama.fleet.svc:8000", "kubernetes ns/svc:http"
    found: int  # servers that take requests
    draining: int  # servers leaving (no new requests)
    found_at: float  # time.time() of the lookup (the report looks once, at its start)
    error: str | None  # why the lookup failed or found nothing; None when it worked


@dataclass(frozen=True)
class ModelRow:
    """A model's summary line."""

    name: str
    kind: str
    policy: str
    servers: int
    healthy: int
    picked: str | None  # host:port, or None when no server answered
    discovery: DiscoveryRow | None = None  # None: its servers are listed in the fleet file


@dataclass(frozen=True)
class FleetReport:
    """Everything one round of probes found."""

    servers: tuple[ServerRow, ...]
    models: tuple[ModelRow, ...]
    config: str | None
    policy: str
    timeout_s: float
    took_s: float
    at: float  # time.time() when the round finished

    @property
    def ok(self) -> bool:
        """Every model has at least one server that answered."""
        return all(m.healthy > 0 for m in self.models)

    @property
    def unhealthy_models(self) -> list[str]:
        return [m.name for m in self.models if m.healthy == 0]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` shape: {"servers": [...], "models": {...}, ...}."""
        return {
            "servers": [asdict(row) for row in self.servers],
            "models": {m.name: {k: v for k, v in asdict(m).items()
                                if k != "name" and not (k == "discovery" and v is None)}
                       for m in self.models},
            "ok": self.ok,
            "config": self.config,
            "policy": self.policy,
            "timeout_s": self.timeout_s,
            "took_s": round(self.took_s, 4),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.at)),
        }


class FleetProber:
    """Probes a fleet, round after round, with one HTTP session and one routing Pool
    per model kept between rounds, so `--watch` shows health as a client would
    learn it (a server that went down and came back, a server that slowed)."""

    def __init__(self, config: FleetConfig, *, models: Sequence[str] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.config = config
        names = list(models) if models else list(config.models)
        self.models: list[ModelSpec] = [config.models[name] for name in names]
        self.timeout_s = timeout_s
        self._transport = AiohttpTransport(limit_per_host=8, connect_timeout_s=timeout_s)
        self._pools: dict[str, Pool] = {}
        self._discovered: dict[str, DiscoveryRow] = {}  # by model, once found
        self._caches: dict[tuple[str, str], CacheSample] = {}  # the previous round's, per server

    async def probe(self) -> FleetReport:
        """One round: every server of every model at once."""
        started = time.perf_counter()
        if not self._pools:
            await self._find_servers()
        jobs = [(spec, server) for spec in self.models for server in spec.servers]
        results = await asyncio.gather(*(self._probe_one(spec, server) for spec, server in jobs))
        by_model: dict[str, list[tuple[ServerSpec, ProbeResult]]] = {}
        for (spec, server), result in zip(jobs, results, strict=True):
            by_model.setdefault(spec.name, []).append((server, result))
        rows: list[ServerRow] = []
        summaries: list[ModelRow] = []
        for spec in self.models:
            model_rows = self._model_rows(spec, by_model.get(spec.name, []))
            rows.extend(model_rows)
            picked = next((r.server for r in model_rows if r.picked), None)
            summaries.append(ModelRow(name=spec.name, kind=spec.kind,
                                      policy=self.config.routing.policy,
                                      servers=len(model_rows),
                                      healthy=sum(r.healthy for r in model_rows), picked=picked,
                                      discovery=self._discovered.get(spec.name)))
        return FleetReport(servers=tuple(rows), models=tuple(summaries),
                           config=str(self.config.path) if self.config.path else None,
                           policy=self.config.routing.policy, timeout_s=self.timeout_s,
                           took_s=time.perf_counter() - started, at=time.time())

    async def _find_servers(self) -> None:
        """Each discovered model's servers, looked up once (all models at once); then the
        client's own routing state per model, so "would pick" is the client's answer."""
        found = await asyncio.gather(*(self._look_up(spec) for spec in self.models
                                       if spec.discover is not None))
        for row, servers, spec in found:
            self._discovered[spec.name] = row
            self.models = [replace(s, servers=servers, discover=None) if s is spec else s
                           for s in self.models]
        self._pools = {spec.name: Route(spec, self.config.routing).pool for spec in self.models}

    async def _look_up(self, spec: ModelSpec) -> tuple[DiscoveryRow, tuple[ServerSpec, ...], ModelSpec]:
        assert spec.discover is not None
        described = spec.discover.describe()
        snapshots = None
        wait_s = max(self.timeout_s, 5.0)
        try:
            source = source_for(spec.discover)  # (a missing library raises here)
            described = source.describe()
            snapshots = source.snapshots()
            snapshot = await asyncio.wait_for(anext(snapshots), wait_s)
        except asyncio.TimeoutError:
            snapshot = Snapshot(ready=(), error=f"no answer in {wait_s:g} s")
        except Exception as exc:  # a broken source: said, not raised
            snapshot = Snapshot(ready=(), error=f"{type(exc).__name__}: {exc}")
        finally:
            close = getattr(snapshots, "aclose", None)
            if close is not None:
                await close()
        error = snapshot.error or (None if snapshot.ready else "the answer named no ready server")
        servers = tuple(ServerSpec(host=host, port=port) for host, port in snapshot.ready)
        row = DiscoveryRow(source=described, found=len(servers),
                           draining=len(snapshot.draining), found_at=time.time(),
                           error=_masked(error, spec) if error else None)
        return row, servers, spec

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> FleetProber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _probe_one(self, spec: ModelSpec, server: ServerSpec) -> ProbeResult:
        try:
            # probe_server bounds itself by timeout_s; the margin only guards against a bug there.
            return await asyncio.wait_for(
                probe_server(self._transport, spec, server, self.config.benchmark,
                             stall_s=self.timeout_s, timeout_s=self.timeout_s),
                self.timeout_s + 1.0)
        except asyncio.TimeoutError:
            return ProbeResult(model=spec.name, server=server.address, ok=False,
                               reason=f"no answer in {self.timeout_s:g} s",
                               failure=Failure.TIMEOUT, at=time.time())

    def _model_rows(self, spec: ModelSpec,
                    probed: list[tuple[ServerSpec, ProbeResult]]) -> list[ServerRow]:
        pool = self._pools[spec.name]
        for server, result in probed:
            apply_probe(pool.endpoints[server.address], result, pool)
        work = benchmark_work(spec, self.config.benchmark)
        picked = _would_pick(pool, self.config.routing.policy, work)
        answered = [(s, r) for s, r in probed if r.ok and r.total_s is not None]
        fastest = min(answered, key=lambda sr: sr[1].total_s or 0.0, default=None)
        rate = self.config.routing.latency_growing_rate
        rows = []
        for server, result in probed:
            endpoint = pool.endpoints[server.address]
            status, reason = _status(result, endpoint, fastest, rate, self.timeout_s)
            cache = result.queue.cache if result.queue else None
            before = self._caches.pop((spec.name, server.address), None)
            if cache is not None:
                self._caches[(spec.name, server.address)] = cache
            rows.append(_row(spec, server, result, endpoint, status, reason, work,
                             picked is not None and picked.address == server.address,
                             None if cache is None else cache.ratio_since(before)))
        return rows


async def probe_fleet(config: FleetConfig, *, models: Sequence[str] | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> FleetReport:
    """One report of the fleet (or of `models` only): every server probed at once."""
    async with FleetProber(config, models=models, timeout_s=timeout_s) as prober:
        return await prober.probe()


def _would_pick(pool: Pool, policy: str, work: Any) -> Endpoint | None:
    """The server the policy would send the next request to.

    peak_ewma draws two servers at random and keeps the better, so its one
    draw would make the marker flicker between refreshes; the report shows the
    server it prefers over every other (lowest expected latency), which its
    draws approximate. The other policies are asked directly.
    """
    usable = [e for e in pool.endpoints.values() if e.usable() and e.health is not Health.DOWN]
    if not usable:
        return None
    if policy == "peak_ewma":
        return min(usable, key=lambda e: e.expected_latency(work))
    chosen = pool.choose(work)
    return chosen if chosen in usable else None


def _status(result: ProbeResult, endpoint: Endpoint,
            fastest: tuple[ServerSpec, ProbeResult] | None, rate: float,
            timeout_s: float) -> tuple[str, str]:
    if not result.ok:
        if result.failure is Failure.BACKPRESSURE:
            return "degraded", f"busy: {_why_failed(result, timeout_s)}"
        return "down", _why_failed(result, timeout_s)
    if fastest is not None and fastest[1].total_s and result.total_s is not None:
        best = fastest[1].total_s
        if result.total_s > rate * best and result.total_s - best > NOISE_S:
            return "degraded", f"{result.total_s / best:.1f}x slower than {fastest[0].address}"
    if endpoint.health is Health.DEGRADED:  # --watch: slower than it used to be
        return "degraded", endpoint.reason or "slower than before"
    return "up", ""


def _why_failed(result: ProbeResult, timeout_s: float) -> str:
    """"refused", "timeout", "HTTP 500: ...": what an operator scans the column for."""
    text = result.reason or ""
    if result.failure is None:  # the server refused the benchmark request itself
        return text or "rejected the probe"
    if _HTTP_STATUS.match(text):
        return text  # "HTTP 500: the server's own message"
    if result.failure is Failure.TIMEOUT:
        return f"timeout: no answer in {timeout_s:g} s"
    if result.failure is Failure.REFUSED:
        if "Connect call failed" in text or "Connection refused" in text:
            return "refused: nothing listens on that port"
        return f"refused: {text}" if text else "refused"
    return f"{result.failure.value}: {text}" if text else result.failure.value


def _row(spec: ModelSpec, server: ServerSpec, result: ProbeResult, endpoint: Endpoint,
         status: str, reason: str, work: Any, picked: bool,
         recent_ratio: float | None = None) -> ServerRow:
    ttft = tokens_per_s = ms_per_input = None
    if result.ok and result.total_s is not None:
        if spec.kind == "embedding":
            ms_per_input = result.total_s * 1000.0  # the benchmark sends one input
        else:
            ttft = result.ttft_s
            # Over the whole request, not the decode alone: a handful of tokens often
            # arrive in one burst, and a rate over the gaps between them is noise.
            if result.output_tokens and result.total_s > 0:
                tokens_per_s = result.output_tokens / result.total_s
    queue = result.queue
    cache = queue.cache if queue else None
    expected = endpoint.expected_latency(work) if endpoint.health is not Health.DOWN and \
        endpoint.service_time(work) is not None else None
    return ServerRow(
        model=spec.name, kind=spec.kind, server=server.address, status=status, reason=_masked(reason, spec),
        detail=_masked(result.reason, spec), healthy=result.ok,
        latency_s=result.total_s if result.ok else None, ttft_s=ttft,
        tokens_per_s=tokens_per_s, ms_per_input=ms_per_input,
        running=queue.running if queue else None, waiting=queue.waiting if queue else None,
        prefix_hits=cache.hits if cache else None, prefix_queries=cache.queries if cache else None,
        prefix_hit_ratio=cache.hit_ratio if cache else None, prefix_hit_ratio_recent=recent_ratio,
        expected_latency_s=expected, picked=picked)


def _masked(text: str, spec: ModelSpec) -> str:
    """A server may echo what it was sent; the api key must never reach a report."""
    if spec.api_key and spec.api_key in text:
        text = text.replace(spec.api_key, "***")
    return text

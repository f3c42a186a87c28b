"""modelfleet's own Prometheus series, `modelfleet_*`, for the library and the gateway.

Opt-in: `AsyncModelServer(..., metrics=registry)` with a `prometheus_client`
`CollectorRegistry`; without one, nothing here is imported and a request pays one
`is None` check. Serve the registry with `serve_metrics` (or the gateway's /metrics).

Names follow Prometheus' rules: base units, `_total` for counters, the labels `model`
(the fleet file's model key) and `server` (`host:port`, never a key or URL with a
secret). Never the engines' `vllm:` prefix: both are often scraped into one Prometheus.

Per request (recorded by the retry loop, `client/attempt.py`, so every path counts):

- `modelfleet_requests_total{model,server,outcome}`: a request's final result, on the
  server that gave it (the last one tried; "" when none could be). outcome is one of
  OUTCOMES: ok, rejected (the request's own 4xx), unavailable (no server could answer),
  interrupted (a stream broke after its first token), cancelled (the caller left),
  error (anything else).
- `modelfleet_request_duration_seconds{model}`: successful requests, retries included;
  a stream's runs to its last token.
- `modelfleet_time_to_first_token_seconds{model}`: streams, and whole answers read as a
  stream underneath (those asked for without max_tokens); retries included.
- `modelfleet_request_attempts{model}`: servers tried per request (1: no retry).
- `modelfleet_retries_total{model,reason}`: an attempt failed and another was made; reason
  is the failure (refused, timeout, server_error, backpressure, misconfigured).
- `modelfleet_hedges_total{model,outcome}`: hedged requests (`routing.hedge_after`,
  client/hedge.py); outcome: sent (a copy went to another server), won (the copy's first
  token came first), lost (the original's did), denied_by_budget (no copy: the hedge
  budget was spent). Recorded by the race itself, so only where hedging is on.
- `modelfleet_stream_continuations_total{model,outcome}`: a stream broke after its first
  token; outcome is one of CONTINUATION_OUTCOMES: continued (it went on on another server),
  unavailable (no server could go on, or its retries were spent), rejected (the server
  asked to go on refused the continuation: a 4xx), off (continuation is turned off).

Per server, read from the routing state when Prometheus scrapes (nothing on the hot
path): `modelfleet_server_usable`, `modelfleet_server_state{state}` (up, degraded,
down: 1 for the current one), `modelfleet_server_requests_in_flight` (from this
client), `modelfleet_server_expected_latency_seconds` (of a 128+128-token request now),
`modelfleet_server_requests_running` / `_waiting` (the engine's own queue, as last
scraped) and `modelfleet_server_prefix_cache_hit_ratio` (the engine's prefix-cache hits
over queries between its last two scrapes). Only models that were used have servers here.

Per model whose servers are found (`discover:`, client/discovered.py), also read at
scrape time: `modelfleet_discovery_servers{model,state}` (ready: in the pool; draining:
taking no new request, some still finishing), `modelfleet_discovery_last_change_timestamp_seconds{model}`
(when the set last changed, Unix time), and the counter
`modelfleet_discovery_errors_total{model}` (lookups that failed; the last known-good
servers were kept).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from modelfleet.errors import NoServerAvailable, RequestRejected, StreamInterrupted
from modelfleet.routing import HEDGE_OUTCOMES, Failure, Health

if TYPE_CHECKING:
    from modelfleet._transports.models import CacheSample
    from modelfleet.client.route import Route

OUTCOMES = ("ok", "rejected", "unavailable", "interrupted", "cancelled", "error")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10)
CONTINUATION_OUTCOMES = ("continued", "unavailable", "rejected", "off")

_clock = time.perf_counter


def outcome_of(exc: BaseException) -> str:
    """The `outcome` label of a request that ended with `exc`."""
    if isinstance(exc, NoServerAvailable):
        return "unavailable"
    if isinstance(exc, RequestRejected):
        return "rejected"
    if isinstance(exc, StreamInterrupted):
        return "interrupted"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "error"


class FleetMetrics:
    """The modelfleet_* series of one registry. One per registry (`for_registry`): clients
    sharing a registry share its counters; the per-server gauges show each (model,
    server) once, from the first client that has it."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, FleetMetrics] = \
        weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> FleetMetrics:
        with cls._lock:
            fleet = cls._by_registry.get(registry)
            if fleet is None:
                fleet = cls._by_registry[registry] = cls(registry)
            return fleet

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("modelfleet_requests_total", "Requests by final outcome.",
                                ("model", "server", "outcome"), registry=registry)
        self.duration = Histogram("modelfleet_request_duration_seconds",
                                  "Successful requests' latency, retries included.", ("model",),
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("modelfleet_time_to_first_token_seconds",
                              "Time to the first token, retries included.", ("model",),
                              buckets=TTFT_BUCKETS, registry=registry)
        self.attempts = Histogram("modelfleet_request_attempts", "Servers tried per request.",
                                  ("model",), buckets=ATTEMPT_BUCKETS, registry=registry)
        self.retries = Counter("modelfleet_retries_total", "Attempts that failed and were retried.",
                               ("model", "reason"), registry=registry)
        self.hedges = Counter("modelfleet_hedges_total", "Hedged requests by outcome.",
                              ("model", "outcome"), registry=registry)
        self.continuations = Counter("modelfleet_stream_continuations_total",
                                     "Streams broken after their first token, by what followed.",
                                     ("model", "outcome"), registry=registry)
        self.discovery_errors = Counter("modelfleet_discovery_errors_total",
                                        "Discovery lookups that failed (the last known-good "
                                        "servers were kept).", ("model",), registry=registry)
        self._models: dict[str, ModelMetrics] = {}
        self._routes: weakref.WeakSet[Route] = weakref.WeakSet()
        registry.register(ServerCollector(self))

    def model(self, route: Route) -> ModelMetrics:
        """The series of `route`'s model; its servers join the per-server gauges."""
        with self._lock:
            self._routes.add(route)
            name = route.spec.name
            metrics = self._models.get(name)
            if metrics is None:
                metrics = self._models[name] = ModelMetrics(self, name)
            return metrics

    def forget(self, route: Route) -> None:
        """A closed client's route leaves the gauges (its counters stay: they are history)."""
        with self._lock:
            self._routes.discard(route)

    def routes(self) -> list[Route]:
        """The routes to read now (a copy: clients on other threads add theirs)."""
        with self._lock:
            return list(self._routes)


class ModelMetrics:
    """One model's children of the series, bound once: a request costs dict lookups and
    observes, no label resolution."""

    __slots__ = ("model", "_fleet", "duration", "ttft", "attempts", "_requests", "_retries",
                 "_hedges", "_continuations", "cache_ratio", "_cache_seen", "_discovery_errors")

    def __init__(self, fleet: FleetMetrics, model: str) -> None:
        self.model = model
        self._fleet = fleet
        self.duration = fleet.duration.labels(model)
        self.ttft = fleet.ttft.labels(model)
        self.attempts = fleet.attempts.labels(model)
        self._requests: dict[tuple[str, str], Any] = {}
        # Every reason from the start, at 0: a series that appears only with its first
        # retry makes rate() and the dashboard blind to that first one.
        self._retries = {failure: fleet.retries.labels(model, failure.value) for failure in Failure}
        self._hedges = {outcome: fleet.hedges.labels(model, outcome) for outcome in HEDGE_OUTCOMES}
        self._continuations = {outcome: fleet.continuations.labels(model, outcome)
                               for outcome in CONTINUATION_OUTCOMES}
        self.cache_ratio: dict[str, float] = {}  # by server: the prefix-cache hit ratio
        self._cache_seen: dict[str, CacheSample] = {}  # its last sample with counters
        self._discovery_errors: Any = None  # bound for models with discover: only

    def tally(self) -> Tally:
        """One request starts now."""
        return Tally(self)

    def finished(self, server: str, started: float, exc: BaseException | None = None) -> None:
        """A request on `server` ended, well or with `exc` (`started`: `perf_counter()`
        when it began). The retry loop calls it, and a stream's owner at the stream's end."""
        if exc is None:
            self.count(server, "ok")
            self.duration.observe(_clock() - started)
        else:
            self.count(server, outcome_of(exc))

    def count(self, server: str, outcome: str) -> None:
        child = self._requests.get((server, outcome))
        if child is None:
            child = self._requests[server, outcome] = \
                self._fleet.requests.labels(self.model, server, outcome)
        child.inc()

    def retried(self, failure: Failure) -> None:
        self._retries[failure].inc()

    def hedged(self, outcome: str) -> None:
        self._hedges[outcome].inc()
    def continuation(self, outcome: str) -> None:
        """A stream broke after its first token, and then `outcome` (CONTINUATION_OUTCOMES)."""
        self._continuations[outcome].inc()

    def discovery_failed(self, count: int = 1) -> None:
        """A discovery lookup failed (0: the model's series is made, at 0)."""
        if self._discovery_errors is None:
            self._discovery_errors = self._fleet.discovery_errors.labels(self.model)
        self._discovery_errors.inc(count)

    def observe_cache(self, server: str, cache: CacheSample | None) -> None:
        """A probe's scrape of the server's prefix-cache counters: the ratio of hits to
        queries since the scrape before (the server's own ratio when it has no counters,
        or the first time, or after it restarted)."""
        if cache is None:
            return
        if cache.hits is None or cache.queries is None:
            if cache.hit_ratio is not None:
                self.cache_ratio[server] = cache.hit_ratio
            return
        before = self._cache_seen.get(server)
        self._cache_seen[server] = cache
        recent = cache.ratio_since(before)
        if recent is not None:
            self.cache_ratio[server] = recent
        elif before is None or cache.queries < before.queries:  # type: ignore[operator]
            ratio = cache.hit_ratio
            if ratio is not None:
                self.cache_ratio[server] = ratio
        # else: no prompt since the last scrape; the ratio stands


class Tally:
    """One request, as the retry loop sees it: when it began, the servers tried."""

    __slots__ = ("metrics", "started", "attempt_started", "attempts", "server")

    def __init__(self, metrics: ModelMetrics) -> None:
        self.metrics = metrics
        self.started = self.attempt_started = _clock()
        self.attempts = 0
        self.server = ""

    def attempt(self, server: str) -> None:
        self.attempts += 1
        self.server = server
        self.attempt_started = _clock()

    def copy_sent(self) -> None:
        """A hedge: one more attempt, beside the one on `self.server` (which keeps its clock
        until a copy wins)."""
        self.attempts += 1

    def retried(self, failure: Failure) -> None:
        self.metrics.retried(failure)

    def succeeded(self, value: Any, answer: bool) -> None:
        """The attempt on `self.server` succeeded: `value` is a whole answer (`answer`),
        else a stream's opening (its first token is in; its end is `ModelMetrics.finished`)."""
        metrics = self.metrics
        metrics.attempts.observe(self.attempts)
        if not answer:
            metrics.ttft.observe(_clock() - self.started)
            return
        ttft_s = value.ttft_s
        if ttft_s is not None:
            metrics.ttft.observe(self.attempt_started - self.started + ttft_s)
        metrics.finished(self.server, self.started)

    def failed(self, exc: BaseException) -> None:
        self.metrics.attempts.observe(self.attempts)
        self.metrics.count(self.server, outcome_of(exc))


def _after_fork_in_child() -> None:
    """A forked child's clients start afresh (sync.py); the parent's routes are not its own."""
    for fleet in list(FleetMetrics._by_registry.values()):
        fleet._routes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ServerCollector(Collector):
    """The per-server gauges, read from the routes' pools at scrape time."""

    def __init__(self, fleet: FleetMetrics) -> None:
        self._fleet = fleet

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families().values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        seen: set[tuple[str, str]] = set()
        for route in self._fleet.routes():
            model = route.spec.name
            discovery = route.discovery
            if discovery is not None and (model, "") not in seen:
                seen.add((model, ""))
                families["discovered"].add_metric([model, "ready"], len(route.servers))
                families["discovered"].add_metric([model, "draining"], len(discovery.draining()))
                if discovery.last_change is not None:
                    families["changed"].add_metric([model], discovery.last_change)
            ratios = route.metrics.cache_ratio if route.metrics is not None else {}
            for endpoint in list(route.pool.endpoints.values()):
                key = (model, endpoint.address)
                if key in seen:
                    continue
                seen.add(key)
                try:  # read while the client's loop may change it: a torn read is skipped
                    status = endpoint.status()
                    usable = endpoint.usable()
                except Exception:
                    continue
                labels = [model, endpoint.address]
                families["usable"].add_metric(labels, 1.0 if usable else 0.0)
                for health in Health:
                    families["state"].add_metric([*labels, health.value],
                                                 1.0 if status.health is health else 0.0)
                families["in_flight"].add_metric(labels, status.in_flight)
                for name, value in (("expected", status.expected_latency_s),
                                    ("running", status.queue_running),
                                    ("waiting", status.queue_waiting),
                                    ("cache", ratios.get(endpoint.address))):
                    if value is not None:
                        families[name].add_metric(labels, value)
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        labels = ["model", "server"]

        def gauge(name: str, text: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"modelfleet_server_{name}", text, labels=[*labels, *extra])

        return {
            "usable": gauge("usable", "1 if the server may take a request now."),
            "state": gauge("state", "The server's health state (1: current).", ("state",)),
            "in_flight": gauge("requests_in_flight", "Requests from this client on it now."),
            "expected": gauge("expected_latency_seconds",
                              "Expected latency of a 128+128-token request there now."),
            "running": gauge("requests_running", "The engine's running requests (its /metrics)."),
            "waiting": gauge("requests_waiting", "The engine's waiting requests (its /metrics)."),
            "cache": gauge("prefix_cache_hit_ratio",
                           "The engine's prefix-cache hits / queries between its last scrapes."),
            "discovered": GaugeMetricFamily(
                "modelfleet_discovery_servers", "Servers found through discovery, by state "
                "(ready: taking requests; draining: no new ones).", labels=["model", "state"]),
            "changed": GaugeMetricFamily(
                "modelfleet_discovery_last_change_timestamp_seconds",
                "When the model's discovered set of servers last changed (Unix time).",
                labels=["model"]),
        }


class MetricsServer:
    """`serve_metrics`' HTTP server on its thread; `close()` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve `registry` at http://host:port/metrics on a daemon thread (port 0: any free
    one; see `.port`). Loopback by default: a metrics port is not for the world."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)

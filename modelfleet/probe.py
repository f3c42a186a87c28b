"""One look at one server: the tiny benchmark request and a /metrics scrape.

The client runs these in the background (never on a request's path) to keep each
endpoint's latency, health and queue fresh, and `modelfleet report` runs them once
to print the fleet. A probe never raises for a server's trouble, whatever the server
sent: the trouble is the result (so the background loop and its tasks outlive any answer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from modelfleet._exceptions import EngineFailure
from modelfleet._transports.base import AsyncBaseTransport
from modelfleet._transports.models import QueueSample
from modelfleet.config import BenchmarkSpec, ModelSpec, ServerSpec
from modelfleet.errors import RequestRejected
from modelfleet.routing import Endpoint, Failure, Pool, Work

log = logging.getLogger("modelfleet.probe")


@dataclass(frozen=True)
class ProbeResult:
    """What one probe of one server found."""

    model: str
    server: str  # host:port
    ok: bool  # the benchmark request succeeded
    reason: str = ""  # why not, when not ok
    failure: Failure | None = None  # the routing kind of a server failure (None if ok/rejected)
    retry_after_s: float | None = None
    ttft_s: float | None = None  # from the request going out to the first token
    total_s: float | None = None
    output_tokens: int = 0
    work: Work | None = None  # the size of the benchmark request, to normalise its latency
    queue: QueueSample | None = None  # the server's own running/waiting, when /metrics has them
    at: float = 0.0  # time.time() when the probe finished


def benchmark_work(model: ModelSpec, benchmark: BenchmarkSpec) -> Work:
    """The size of the benchmark request for this model."""
    if model.kind == "embedding":
        return Work.for_embedding(benchmark.embedding_input)
    return Work.for_chat(benchmark.messages, benchmark.max_tokens)


async def probe_server(transport: AsyncBaseTransport, model: ModelSpec, server: ServerSpec,
                       benchmark: BenchmarkSpec, *, stall_s: float,
                       timeout_s: float) -> ProbeResult:
    """/metrics scrape, then the benchmark request; never raises for the server.

    The scrape goes first so the server's queue is read without our own probe in it
    (an idle server must read as idle, not as running one request).
    """
    started = time.monotonic()
    queue = await _scrape(transport, model, server, timeout_s=min(timeout_s / 4, 2.0))
    left = timeout_s - (time.monotonic() - started)  # the whole probe stays within timeout_s
    bench = await _benchmark(transport, model, server, benchmark, stall_s=min(stall_s, left),
                             timeout_s=left)
    return ProbeResult(**{**bench, "queue": queue, "at": time.time()})


async def _benchmark(transport: AsyncBaseTransport, model: ModelSpec, server: ServerSpec,
                     benchmark: BenchmarkSpec, *, stall_s: float, timeout_s: float) -> dict:
    work = benchmark_work(model, benchmark)
    base = {"model": model.name, "server": server.address, "work": work}
    try:
        if model.kind == "embedding":
            answer = await transport.embed(server, {"model": model.wire_name,
                                                    "input": [benchmark.embedding_input]},
                                           api_key=model.api_key, stall_s=stall_s,
                                           timeout_s=timeout_s)
            return {**base, "ok": True, "ttft_s": answer.total_s, "total_s": answer.total_s}
        generation = await transport.generate(
            server, "/v1/chat/completions",
            {"model": model.wire_name, "messages": [dict(m) for m in benchmark.messages],
             "max_tokens": benchmark.max_tokens},
            api_key=model.api_key, stall_s=stall_s, timeout_s=timeout_s)
        return {**base, "ok": True, "ttft_s": generation.ttft_s, "total_s": generation.total_s,
                "output_tokens": generation.output_tokens}
    except EngineFailure as exc:
        return {**base, "ok": False, "reason": exc.reason, "failure": exc.failure,
                "retry_after_s": exc.retry_after_s}
    except RequestRejected as exc:  # the benchmark itself is wrong for this model, not the server
        return {**base, "ok": False, "reason": f"rejected the benchmark request: {exc.message}"}
    except Exception as exc:  # an answer the transport did not foresee: still the server's
        why = f"{type(exc).__name__}: {exc}"
        log.warning("probe of %s for %s: unexpected answer (%s)", server.address, model.name, why)
        return {**base, "ok": False, "reason": f"unexpected answer ({why})",
                "failure": Failure.SERVER_ERROR}


async def _scrape(transport: AsyncBaseTransport, model: ModelSpec, server: ServerSpec, *,
                  timeout_s: float) -> QueueSample | None:
    try:
        return await transport.queue(server, timeout_s=timeout_s, api_key=model.api_key)
    except EngineFailure:
        return None
    except Exception as exc:  # garbage for /metrics: its queue is unknown, nothing more
        log.debug("/metrics of %s unreadable: %s: %s", server.address, type(exc).__name__, exc)
        return None


def apply_probe(endpoint: Endpoint, result: ProbeResult, pool: Pool | None = None) -> None:
    """Teach an endpoint what a probe found (the probe is the way back up for a down server),
    and the pool's prefix index what the server says of its cache."""
    if result.queue is not None:
        endpoint.observe_queue(running=result.queue.running, waiting=result.queue.waiting)
        cache = result.queue.cache
        if pool is not None and cache is not None:
            pool.observe_cache(endpoint.address, hits=cache.hits, queries=cache.queries,
                               usage=cache.usage, capacity_tokens=cache.capacity_tokens)
    if result.ok:
        endpoint.observe_success(ttft_s=result.ttft_s, total_s=result.total_s, work=result.work,
                                 output_tokens=result.output_tokens)
    elif result.failure is not None:
        endpoint.observe_failure(result.failure, result.reason, retry_after_s=result.retry_after_s)

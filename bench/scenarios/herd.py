"""Eight independent client processes, each with its own client object, sharing one fleet.

The herd problem: every client that only knows its own traffic sees the same "fastest" server
and they all pile onto it. modelfleet's answer is to read each server's own queue from its
/metrics, which every client sees alike. Four equal servers, eight processes started with
multiprocessing, each building its own contender and running a closed loop; they start
together on a signal once all are warmed up. The processes come from a forkserver that has
imported the client libraries once (a fresh interpreter importing LiteLLM eight times over
costs minutes of CPU on two cores); each child still builds its own client after the fork,
so nothing but imported code is shared.
Measured: requests per server (max/min, target at most 2), p99, both beside round-robin's.
The oracle is not in this scenario: it counts its own in-flight requests as the servers'
queues, which eight separate oracles cannot do.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import multiprocessing as mp
import os
import queue
from collections.abc import Sequence

from bench.contenders import Target, Unavailable, build
from bench.contenders.base import timed
from bench.fleet import ServerPlan
from bench.measure import Sample, counts_by_server, ratio
from bench.scenarios.base import Context, Outcome, Table, latency_summary, ms, times, warm_up
from bench.workload import ChatCall, chat_calls, closed_loop

SPEED = 2.0
PROCESSES = 8
CONCURRENCY_EACH = 4
MODEL = "chat-herd"
START_TIMEOUT_S = 180.0


def _child(worker: int, name: str, target: Target, calls: Sequence[ChatCall],
           warmup: Sequence[ChatCall], ready: mp.Queue, go: mp.Event, results: mp.Queue) -> None:
    """One client process: build, warm up, say ready, wait for the signal, run, send samples."""
    try:
        samples = asyncio.run(_child_async(worker, name, target, calls, warmup, ready, go))
        results.put((worker, samples, None))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # the parent must hear about it, not wait for a timeout
        with contextlib.suppress(Exception):
            ready.put(worker)
        results.put((worker, [], f"{type(exc).__name__}: {exc}"))


async def _child_async(worker: int, name: str, target: Target, calls: Sequence[ChatCall],
                       warmup: Sequence[ChatCall], ready: mp.Queue, go: mp.Event) -> list[Sample]:
    contender = build(name)
    try:
        await contender.open(target)
        await warm_up(contender, warmup)
        ready.put(worker)
        started = await asyncio.to_thread(go.wait, START_TIMEOUT_S)
        if not started:
            raise TimeoutError("the start signal never came")

        async def send(call: ChatCall, t0: float) -> Sample:
            return await timed("chat", contender, call, t0, worker=worker)

        samples, _ = await closed_loop(send, calls, CONCURRENCY_EACH)
        return samples
    finally:
        await contender.close()


async def _run_herd(ctx: Context, name: str, target: Target, per_process: int,
                    warmup: Sequence[ChatCall]) -> list[Sample] | None:
    try:  # fail here, once, rather than in eight children
        build(name)
    except Unavailable as exc:
        ctx.skip(name, str(exc))
        return None
    processes = _process_context()
    ready, results, go = processes.Queue(), processes.Queue(), processes.Event()
    procs = []
    for worker in range(PROCESSES):
        calls = chat_calls(per_process, ctx.seed + 100 * worker)
        procs.append(processes.Process(target=_child, daemon=True,
                                   args=(worker, name, target, calls, warmup, ready, go, results)))
    ctx.progress.line(f"  {name}: starting {PROCESSES} client processes")
    samples: list[Sample] = []
    failures: list[str] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            await asyncio.to_thread(ready.get, True, START_TIMEOUT_S)
        ctx.progress.line(f"  {name}: all {PROCESSES} ready, go")
        go.set()
        for _ in procs:
            worker, got, error = await asyncio.to_thread(results.get, True, START_TIMEOUT_S)
            samples += got
            if error:
                failures.append(f"process {worker}: {error}")
    except queue.Empty:
        failures.append("a client process did not report within "
                        f"{START_TIMEOUT_S:.0f}s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    for failure in failures:
        ctx.skip(name, f"herd {failure}")
    ctx.progress.line(f"  {name}: done, {len(samples)} requests")
    return samples if samples and not failures else None


def _process_context() -> mp.context.BaseContext:
    """A forkserver that preloads the clients (spawn where there is no forkserver)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before the server imports it
    context = mp.get_context("forkserver")
    preload = ["bench.scenarios.herd", "aiohttp", "modelfleet.config"]
    for module in ("modelfleet.client", "litellm"):
        if importlib.util.find_spec(module) is not None:
            preload.append(module)
    context.set_forkserver_preload(preload)
    return context


async def run(ctx: Context) -> Outcome:
    names = [n for n in ctx.contenders if n not in ("raw-aiohttp", "oracle")]
    per_process = ctx.scale.n(full=60, quick=15)
    outcome = Outcome(
        "herd",
        f"Four equal chat sims (`--speed {SPEED:g}`); {PROCESSES} client processes "
        f"(multiprocessing, forked from a server that preloaded the client libraries), each "
        f"with its own contender object, closed loop at "
        f"concurrency {CONCURRENCY_EACH} each ({PROCESSES * CONCURRENCY_EACH} in all), "
        f"{per_process} requests each, started together after a warm-up.")
    results: dict[str, list[Sample]] = {}
    async with ctx.fleet([ServerPlan(MODEL, speed=SPEED) for _ in range(4)]) as fleet:
        servers = tuple(s.address for s in fleet.servers)
        target = Target(MODEL, "chat", servers, ctx.tuning)
        warmup = chat_calls(8, ctx.seed + 1, output_tokens=(2, 8))
        for name in names:
            samples = await _run_herd(ctx, name, target, per_process, warmup)
            await fleet.reset()
            if samples is not None:
                results[name] = samples
    rr = results.get("modelfleet:round_robin")
    rr_p99 = latency_summary(rr)["p99_s"] if rr else float("nan")
    rr_spread = _spread(rr, servers) if rr else float("nan")
    table = Table("herd: 8 independent clients on 4 equal servers",
                  ["contender", "requests per server", "max/min", "max/min vs round_robin",
                   "p50 ms", "p99 ms", "p99 / round_robin", "errors"])
    for name, samples in results.items():
        s = latency_summary(samples)
        counts = counts_by_server(samples)
        spread = _spread(samples, servers)
        table.rows.append([name, " / ".join(str(counts.get(a, 0)) for a in servers),
                           "inf" if spread == float("inf") else f"{spread:.2f}",
                           times(ratio(spread, rr_spread)), ms(s["p50_s"]), ms(s["p99_s"]),
                           times(ratio(s["p99_s"], rr_p99)), str(s["errors"])])
        outcome.data[name] = {**s, "max_over_min": spread, "p99_vs_round_robin":
                              ratio(s["p99_s"], rr_p99)}
    table.notes.append("Target: max/min at most 2. Requests per server counts only the bench's "
                       "own requests (not probes), as each client process reported them.")
    outcome.tables.append(table)
    outcome.cdfs["herd"] = {n: [x.latency_s for x in s if x.ok] for n, s in results.items()}
    return outcome


def _spread(samples: Sequence[Sample], servers: Sequence[str]) -> float:
    counts = counts_by_server(samples)
    values = [counts.get(a, 0) for a in servers]
    if not values or max(values) == 0:
        return float("nan")
    return float("inf") if min(values) == 0 else max(values) / min(values)

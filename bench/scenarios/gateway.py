"""What the gateway costs: the same load straight to a zero-delay sim and through it.

A sim at `--speed 1e6` answers without sleeping, so everything measured is HTTP and routing
work. Raw aiohttp straight to the sim is the floor ("direct"); the same client pointed at
`modelfleet gateway` (one worker, then two on one port) pays one more hop, the gateway's
parsing of the body and its routing. Whole answers and streams, at concurrency 1 and 64:
throughput as a fraction of direct, added p50/p99, added time to first token. The targets
(issue 14): at least 60% of direct throughput with `--workers 2`, at most 2 ms added to the
time to first token at concurrency 1.

On a 2-core machine the client, the sim and the gateway's workers share the cores, so the
gateway's fraction is partly a measure of the machine: the ratios are taken within a round
(each round measures every path once, in a rotated order) and the median over rounds kept.
Beside them, each process's CPU time per request (user + system, from the kernel): the
client's, the sim's and the gateway's (its parent and workers), which other load on the
machine moves much less than it moves the throughput ratios.
"""

from __future__ import annotations

import asyncio
import math
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.contenders.base import Target, timed
from bench.contenders.raw import RawAiohttp
from bench.fleet import ServerPlan
from bench.measure import Sample, median, percentile
from bench.scenarios.base import Context, Outcome, Table, ms, pct
from bench.workload import ChatCall, closed_loop, steady_rate
from modelfleet.testing import HOST, GatewayProcess, free_port

ZERO_DELAY = 1e6
MODEL = "chat-zero"
CONCURRENCY = (1, 64)
OPS = ("chat", "stream")
DIRECT = "direct"
WORKERS = (1, 2)
MAX_ITEMS = 20000  # per measurement; time-boxed well before this
READY_TIMEOUT_S = 60.0


def _path(workers: int) -> str:
    return f"gateway x{workers}"


async def run(ctx: Context) -> Outcome:
    rounds = 1 if ctx.scale.requests or ctx.scale.quick else 3
    box_s = ctx.scale.seconds(full=1.0, quick=0.4)
    outcome = Outcome(
        "gateway",
        f"One zero-delay chat sim (`--speed {ZERO_DELAY:g}`); raw aiohttp straight to it "
        f"(`{DIRECT}`) and through `modelfleet gateway` with 1 and 2 workers. A 16-word prompt, "
        f"max_tokens 16; streams timed to the first text piece. " + (
            f"One round of exactly {ctx.scale.requests} requests per measurement."
            if ctx.scale.requests else
            f"{rounds} interleaved round(s), each measurement {box_s:g} s."))
    items = [ChatCall(i, f"gateway request {i} " + "lorem ipsum dolor sit amet " * 3, 16)
             for i in range(min(MAX_ITEMS, ctx.scale.requests or MAX_ITEMS))]
    # results[op][concurrency][path] -> per round (samples, requests per second)
    results: dict[str, dict[int, dict[str, list[tuple[list[Sample], float]]]]] = {
        op: {c: {} for c in CONCURRENCY} for op in OPS}
    # cpu[op][concurrency][path] -> per round {"client", "sim", "gateway"}: CPU s per request
    cpu: dict[str, dict[int, dict[str, list[dict[str, float]]]]] = {
        op: {c: {} for c in CONCURRENCY} for op in OPS}
    logs = ctx.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    async with ctx.fleet([ServerPlan(MODEL, speed=ZERO_DELAY)]) as fleet:
        sim = fleet.servers[0]
        config = _fleet_file(logs / "gateway-fleet.yaml", sim.host, sim.port)
        gateways = {w: GatewayProcess(config, free_port(), args=["--workers", str(w)],
                                      log_path=logs / f"gateway-x{w}.log") for w in WORKERS}
        addresses = {DIRECT: sim.address}
        assert sim.proc is not None
        watched: dict[str, dict[str, psutil.Process]] = {
            DIRECT: {"sim": psutil.Process(sim.proc.pid)}}
        try:
            for w, gateway in gateways.items():
                address = f"{HOST}:{gateway.port}"
                ctx.progress.line(f"  starting {_path(w)} on {address}")
                gateway.spawn()
                await asyncio.to_thread(gateway.wait_ready, READY_TIMEOUT_S)
                addresses[_path(w)] = address
                assert gateway.proc is not None
                watched[_path(w)] = {"sim": psutil.Process(sim.proc.pid),
                                     "gateway": psutil.Process(gateway.proc.pid)}
            paths = list(addresses)
            for r in range(rounds):
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                ctx.progress.line(f"gateway round {r + 1}/{rounds}: {', '.join(order)}")
                for path in order:
                    await _measure_path(ctx, path, addresses[path], items, box_s, results,
                                        cpu, watched[path])
        finally:
            for gateway in gateways.values():
                await asyncio.to_thread(gateway.stop)
    _tabulate(outcome, results)
    _tabulate_cpu(outcome, cpu)
    outcome.tables.append(_targets(outcome.data))
    return outcome


def _fleet_file(path: Path, host: str, port: int) -> Path:
    """The gateway's fleet: the one sim, probed rarely (the probes are not what is measured)."""
    path.write_text(
        "routing: {probe_interval_s: 30}\n"
        f"models:\n  {MODEL}:\n    kind: chat\n    backend: sim\n"
        f"    servers:\n      - {{host: {host}, port: {port}}}\n")
    return path


async def _measure_path(ctx: Context, path: str, address: str, items: Sequence[ChatCall],
                        box_s: float, results: dict, cpu: dict,
                        watched: dict[str, psutil.Process]) -> None:
    """Every op and concurrency through one path, with a client of its own."""
    client = RawAiohttp()
    await client.open(Target(MODEL, "chat", (address,), ctx.tuning))
    try:
        await _loop(client, "chat", items[:64], 8, None)  # warm: connections, the gateway's JIT-less paths
        for op in OPS:
            for c in CONCURRENCY:
                before = _cpu_times(watched)
                got = await _loop(client, op, items, c, None if ctx.scale.requests else box_s)
                after = _cpu_times(watched)
                results[op][c].setdefault(path, []).append(got)
                done = max(1, len(got[0]))
                cpu[op][c].setdefault(path, []).append(
                    {who: (after[who] - before[who]) / done for who in after})
    finally:
        await client.close()


def _cpu_times(watched: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) so far: this process (the client: it runs nothing else
    while it measures) and each watched process with its children (a gateway's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    times = {"client": own.ru_utime + own.ru_stime}
    for who, proc in watched.items():
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        times[who] = total
    return times


async def _loop(client: RawAiohttp, op: str, items: Sequence[ChatCall], concurrency: int,
                box_s: float | None) -> tuple[list[Sample], float]:
    """Samples and the steady request rate of one time-boxed closed loop (see overhead)."""
    async def send(item: ChatCall, t0: float) -> Sample:
        return await timed(op, client, item, t0)

    samples, wall = await closed_loop(send, items, concurrency, deadline_s=box_s,
                                      min_done=max(20, 4 * concurrency),
                                      max_s=None if box_s is None else 2 * box_s)
    return samples, steady_rate(samples, concurrency, wall)


def _latencies(samples: Sequence[Sample], op: str) -> list[float]:
    if op == "stream":
        return [s.ttft_s for s in samples if s.ok and s.ttft_s is not None]
    return [s.latency_s for s in samples if s.ok]


def _tabulate(outcome: Outcome, results: dict) -> None:
    table = Table("the gateway against raw aiohttp straight to the server (zero-delay sim)",
                  ["op", "concurrency", "path", "p50 ms", "p99 ms", "added p50 ms",
                   "added p99 ms", "requests/s", "throughput vs direct", "errors"])
    data: dict[str, Any] = {}
    for op in OPS:
        for c in CONCURRENCY:
            runs = results[op][c]
            direct = runs.get(DIRECT, [])
            base = [v for samples, _ in direct for v in _latencies(samples, op)]
            base_p50, base_p99 = percentile(base, 50), percentile(base, 99)
            for path, per_round in runs.items():
                values = [v for samples, _ in per_round for v in _latencies(samples, op)]
                p50, p99 = percentile(values, 50), percentile(values, 99)
                rates = [rate for _, rate in per_round]
                fractions = [rate / d_rate for rate, (_, d_rate) in
                             zip(rates, direct, strict=False) if d_rate]
                fraction = median(fractions) if fractions else math.nan
                errors = sum(1 for samples, _ in per_round for s in samples if not s.ok)
                label = "ttft " if op == "stream" else ""
                table.rows.append([
                    op, str(c), path, label + ms(p50), label + ms(p99),
                    "—" if path == DIRECT else ms(p50 - base_p50),
                    "—" if path == DIRECT else ms(p99 - base_p99),
                    f"{median(rates):.0f}", "—" if path == DIRECT else pct(fraction),
                    str(errors)])
                data.setdefault(op, {}).setdefault(f"c{c}", {})[path] = {
                    "n": len(values), "p50_s": p50, "p99_s": p99,
                    "added_p50_s": p50 - base_p50, "added_p99_s": p99 - base_p99,
                    "requests_per_s": median(rates), "throughput_vs_direct": fraction,
                    "errors": errors}
                if c == 1:
                    outcome.cdfs.setdefault(f"gateway-{op}-c1", {})[path] = values
    table.notes.append("Latency columns for `stream` are the time to the first text piece. "
                       "Targets (issue 14): `gateway x2` >= 60% of direct throughput; <= 2 ms "
                       "added to the time to first token at concurrency 1.")
    outcome.tables.append(table)
    outcome.data = data


def _tabulate_cpu(outcome: Outcome, cpu: dict) -> None:
    table = Table("CPU per request, µs (user + system; median over rounds)",
                  ["op", "concurrency", "path", "client", "sim", "gateway", "total",
                   "total vs direct"])
    data: dict[str, Any] = {}
    for op in OPS:
        for c in CONCURRENCY:
            runs = cpu[op][c]
            per_path = {path: {who: median([r.get(who, 0.0) for r in rounds])
                               for who in ("client", "sim", "gateway")}
                        for path, rounds in runs.items()}
            direct_total = sum(per_path.get(DIRECT, {}).values())
            for path, got in per_path.items():
                total = sum(got.values())
                table.rows.append([
                    op, str(c), path, *(f"{got[who] * 1e6:.0f}" for who in ("client", "sim")),
                    "—" if path == DIRECT else f"{got['gateway'] * 1e6:.0f}",
                    f"{total * 1e6:.0f}",
                    "—" if path == DIRECT or not direct_total else f"{total / direct_total:.2f}x"])
                data.setdefault(op, {}).setdefault(f"c{c}", {})[path] = {
                    **{f"{who}_cpu_s": got[who] for who in got}, "total_cpu_s": total}
    table.notes.append(
        "Each process's CPU time over a measurement divided by the requests it finished "
        "(requests cancelled at the time box's end are left out of the count, not the time). "
        "When the cores are the limit, throughput through the gateway is at most about "
        "`direct total / gateway-path total` of direct.")
    outcome.tables.append(table)
    outcome.data["cpu_per_request"] = data


def _targets(data: dict) -> Table:
    table = Table("gateway targets", ["target", "measured", "met"])
    two = _path(2)
    for op in OPS:
        got = data.get(op, {}).get("c64", {}).get(two, {}).get("throughput_vs_direct", math.nan)
        table.rows.append([f"{op}, concurrency 64: {two} >= 60% of direct throughput",
                           pct(got), _met(got >= 0.6)])
    for path in (_path(1), two):
        added = data.get("stream", {}).get("c1", {}).get(path, {}).get("added_p50_s", math.nan)
        table.rows.append([f"stream, concurrency 1: {path} adds <= 2 ms to time to first token "
                           f"(p50)", ms(added), _met(added <= 0.002)])
    return table


def _met(ok: bool) -> str:
    return "yes" if ok else "no"

"""A fleet that grows and shrinks under load, found through DNS (issue 16).

Six chat sims listen on loopback addresses of their own (127.0.0.2 ... 127.0.0.7), all on
one port, as the pods behind a headless Service do; a DNS server the bench runs
(`modelfleet.testing_dns.LocalDns`, TTL 1 s) names the ones "in the fleet". modelfleet's
client finds them with `discover: {dns: ..., every_s: 1}`. Callers keep a steady closed
loop going while the records grow from 2 servers to 6, one every step, hold, and shrink
back to 2, one every step. A server that leaves the records keeps running (a pod that
turned not-ready), so a request sent to it still succeeds and is seen.

Reported, for each server that joined: seconds from its record appearing to its first
answer, and to its taking half its fair share of the traffic (in 0.5 s windows); for each
that left: requests sent to it after its record went (before the client's next lookup
noticed: bounded by the lookup interval) and after the client dropped it (target 0; those
already in flight finish). And the callers' errors (target 0) and latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from bench.fleet import ServerPlan
from bench.measure import percentile
from bench.scenarios.base import Context, Outcome, Table, ms
from bench.workload import chat_calls
from modelfleet.client import AsyncModelServer
from modelfleet.config import DiscoverSpec, FleetConfig, ModelSpec, RoutingSpec
from modelfleet.testing_dns import LocalDns

MODEL = "chat-scale-out"
NAME = "chat.scale-out.bench"
HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 8))
SPEED = 4.0
CALLERS = 8
EVERY_S = 1.0  # discover.every_s (the records' TTL is 1 s too)
WINDOW_S = 0.5  # traffic-share windows
WATCH_S = 0.02  # how often the client's set of servers is read


@dataclass
class Run:
    """What happened, on one clock (seconds from the run's start)."""

    requests: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, server
    errors: list[str] = field(default_factory=list)
    added: dict[str, float] = field(default_factory=dict)  # address -> record added
    removed: dict[str, float] = field(default_factory=dict)  # address -> record removed
    dropped: dict[str, float] = field(default_factory=dict)  # address -> the client dropped it
    active: list[tuple[float, int]] = field(default_factory=list)  # (t, servers in the records)


async def run(ctx: Context) -> Outcome:
    tiny = ctx.scale.requests is not None
    step_s = 1.5 if tiny else ctx.scale.seconds(full=4.0, quick=2.5)
    peak = 3 if tiny else len(HOSTS)
    plans = [ServerPlan(MODEL, speed=SPEED) for _ in HOSTS[:peak]]
    outcome = Outcome(
        "scale-out",
        f"{peak} chat sims (`--speed {SPEED:g}`) on 127.0.0.2 ... 127.0.0.{peak + 1}, one port; "
        f"a DNS server run by the bench names 2 of them, then one more every {step_s:g} s up to "
        f"{peak}, holds, and drops one every {step_s:g} s back to 2 (record TTL 1 s). "
        f"modelfleet:peak_ewma with `discover: {{dns: ..., every_s: {EVERY_S:g}}}`, "
        f"{CALLERS} callers in a closed loop of whole chat answers (max_tokens 4..32). A "
        f"server that leaves the records keeps running (a pod turned not-ready).")
    run_ = Run()
    async with ctx.fleet(plans, hosts=HOSTS[:peak]) as fleet:
        dns = LocalDns(ttl=1).start()
        try:
            await _run(ctx, fleet.servers[0].port, dns, peak, step_s, run_)
        finally:
            dns.stop()
    _report(outcome, run_, [f"{host}:{fleet.servers[0].port}" for host in HOSTS[:peak]], peak)
    return outcome


async def _run(ctx: Context, port: int, dns: LocalDns, peak: int, step_s: float,
               run_: Run) -> None:
    """The client, warmed up on the first two servers, then the steps under load."""
    addresses = [f"{host}:{port}" for host in HOSTS[:peak]]
    dns.set_addresses(NAME, HOSTS[:2])
    config = FleetConfig(
        models={MODEL: ModelSpec(name=MODEL, backend="sim", discover=DiscoverSpec(
            dns=NAME, port=port, nameserver=dns.nameserver, every_s=EVERY_S))},
        routing=RoutingSpec(max_retry=ctx.tuning.max_retry,
                            request_timeout_s=ctx.tuning.request_timeout_s,
                            probe_interval_s=ctx.tuning.probe_interval_s,
                            stall_timeout_s=ctx.tuning.stall_timeout_s))
    async with AsyncModelServer(config=config, seed=ctx.seed) as client:
        calls = chat_calls(64, ctx.seed, prompt_words=(8, 120), output_tokens=(4, 32))
        for call in calls[:8]:  # warm-up: the first two found, probed, measured
            await client.chat(MODEL, call.messages, max_tokens=call.max_tokens)
        ctx.progress.line(f"scale-out: 2 -> {peak} -> 2 servers, a step every {step_s:g} s")
        await _drive(ctx, client, dns, addresses, peak, step_s, run_)


async def _drive(ctx: Context, client: AsyncModelServer, dns: LocalDns, addresses: list[str],
                 peak: int, step_s: float, run_: Run) -> None:
    """Callers, the watcher of the client's servers, and the records' steps, at once."""
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    calls = chat_calls(4096, ctx.seed + 1, prompt_words=(8, 120), output_tokens=(4, 32))
    stop = asyncio.Event()
    next_call = iter(range(10 ** 9))

    async def caller() -> None:
        while not stop.is_set():
            call = calls[next(next_call) % len(calls)]
            started = clock()
            try:
                result = await client.chat(MODEL, call.messages, max_tokens=call.max_tokens)
            except Exception as exc:  # what the caller would see
                run_.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            run_.requests.append((started, clock(), result.server))

    async def watcher() -> None:
        while not stop.is_set():
            status = (await client.status())[MODEL]
            present = {s.address for s in status.servers}
            now = clock()
            for address, at in run_.removed.items():
                if address not in present and address not in run_.dropped and now >= at:
                    run_.dropped[address] = now
            await asyncio.sleep(WATCH_S)

    def name(count: int) -> None:
        hosts = [a.rsplit(":", 1)[0] for a in addresses[:count]]
        dns.set_addresses(NAME, hosts)
        run_.active.append((clock(), count))

    tasks = [asyncio.ensure_future(caller()) for _ in range(CALLERS)]
    tasks.append(asyncio.ensure_future(watcher()))
    try:
        name(2)
        await asyncio.sleep(step_s)
        for count in range(3, peak + 1):
            run_.added[addresses[count - 1]] = clock()
            name(count)
            await asyncio.sleep(step_s)
        await asyncio.sleep(step_s)  # hold at the peak
        for count in range(peak - 1, 1, -1):
            run_.removed[addresses[count]] = clock()
            run_.dropped.pop(addresses[count], None)
            name(count)
            await asyncio.sleep(step_s)
        await asyncio.sleep(step_s)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def _share_time(run_: Run, address: str, added: float) -> float:
    """Seconds from `added` to the end of the first window in which `address` served at least
    half its fair share (the window's answers / servers in the records then)."""
    end = max((e for _, e, _ in run_.requests), default=added)
    start = added
    while start < end:
        stop = start + WINDOW_S
        inside = [s for b, _, s in run_.requests if start <= b < stop]
        active = next((n for t, n in reversed(run_.active) if t <= start), 2)
        if inside and inside.count(address) >= 0.5 * len(inside) / active:
            return stop - added
        start = stop
    return math.nan


def _report(outcome: Outcome, run_: Run, addresses: list[str], peak: int) -> None:
    joins = Table("scale-out: servers joining (record added)",
                  ["server", "first answer after s", "half its fair share after s"])
    leaves = Table("scale-out: servers leaving (record removed)",
                   ["server", "client dropped it after s", "requests sent after the record went",
                    "requests sent after the client dropped it"])
    data: dict = {"joined": {}, "left": {}}
    for address, added in run_.added.items():
        first = min((b for b, _, s in run_.requests if s == address and b >= added),
                    default=math.nan)
        # (answered requests are stamped with when they were sent; the first one sent to it)
        share = _share_time(run_, address, added)
        data["joined"][address] = {"first_answer_s": first - added, "fair_share_s": share}
        joins.rows.append([address, f"{first - added:.2f}", f"{share:.2f}"])
    for address, removed in run_.removed.items():
        dropped = run_.dropped.get(address, math.nan)
        after_record = sum(1 for b, _, s in run_.requests if s == address and b >= removed)
        after_drop = sum(1 for b, _, s in run_.requests if s == address and b >= dropped)
        data["left"][address] = {"dropped_after_s": dropped - removed,
                                 "requests_after_record_removed": after_record,
                                 "requests_after_client_dropped": after_drop}
        leaves.rows.append([address, f"{dropped - removed:.2f}", str(after_record),
                            str(after_drop)])
    latencies = [e - b for b, e, _ in run_.requests]
    summary = Table("scale-out: callers", ["requests", "caller errors", "p50 ms", "p99 ms"])
    summary.rows.append([str(len(run_.requests)), str(len(run_.errors)),
                         ms(percentile(latencies, 50)), ms(percentile(latencies, 99))])
    if run_.errors:
        summary.notes.append(f"first error: {run_.errors[0][:300]}")
    joins.notes.append(f"Lookups every {EVERY_S:g} s (TTL 1 s); a newcomer is probed before "
                       f"it takes traffic. Fair share: 1/N of a {WINDOW_S:g} s window's "
                       f"answers, N the servers named then (2..{peak}).")
    leaves.notes.append("Targets: 0 requests after the client dropped a server (beyond those "
                        "already in flight); before that, at most a lookup interval's worth.")
    outcome.tables += [summary, joins, leaves]
    outcome.data.update(data, requests=len(run_.requests), caller_errors=len(run_.errors),
                        p50_s=percentile(latencies, 50), p99_s=percentile(latencies, 99),
                        servers=addresses)

"""The tail: 5 % of requests stall 1 s before their first token; what does hedging buy?

Four equal chat sims, each with the stall fault (`{"stall_fraction": 0.05, "stall_s": 1}`:
a random 5 % of requests go silent for a second before their first token, then answer
normally). Open loop, half whole answers (max_tokens) and half streams, the same seeded
requests for every contender. Side by side: modelfleet (peak_ewma) with hedging off, auto
(each server's learnt p95 time to first token), and a fixed delay; and the oracle, which
routes on the sims' true state and knows a stall the moment it starts (hedge_oracle.py).

The extra load is what the servers saw: the sims' `http_requests_total` for chat, counted
around each contender's run (warm-up excluded), over the requests sent. The client's own
background probes are in it for all three modelfleet runs alike (a probe every 5 s here).
Targets (issue 15): auto's p99 <= 0.3x hedging off, its p50 <= 1.1x, its load <= 1.1x.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from bench.contenders import Contender, Target
from bench.contenders.base import timed
from bench.contenders.hedge_oracle import HedgeOracle
from bench.contenders.modelfleet_client import ModelfleetClient
from bench.fleet import ServerPlan, SimFleet
from bench.measure import Sample, ratio
from bench.scenarios.base import (
    Context,
    Outcome,
    Table,
    latency_summary,
    ms,
    times,
    warm_up,
)
from bench.workload import ChatCall, chat_calls, open_loop

SPEED = 8.0  # answers of 4-32 tokens in ~10-100 ms: a 1 s stall is the tail, not the body
SERVERS = 4
STALL = {"stall_fraction": 0.05, "stall_s": 1.0}
RATE_PER_S = 80.0
FIXED_S = 0.1  # the fixed delay a user might pick: a few times a normal first token here
MODEL = "chat-tail"
CALLS = "/v1/chat/completions"
WARMUP = 120  # unrecorded requests first: `auto` learns each server's first-token times


def contenders() -> list[tuple[str, Contender]]:
    def client(name: str, hedge_after: Any) -> Contender:
        return ModelfleetClient("peak_ewma", name=name, routing={"hedge_after": hedge_after})

    return [("hedging off", client("modelfleet:hedge-off", "off")),
            ("hedge_after: auto", client("modelfleet:hedge-auto", "auto")),
            (f"hedge_after: {FIXED_S:g}", client(f"modelfleet:hedge-{FIXED_S:g}", FIXED_S)),
            ("oracle", HedgeOracle())]


async def run(ctx: Context) -> Outcome:
    duration = ctx.scale.seconds(full=20.0, quick=6.0)
    n = ctx.scale.n(full=int(duration * RATE_PER_S), quick=int(duration * RATE_PER_S))
    calls = chat_calls(n, ctx.seed, rate_per_s=n / duration, prompt_words=(8, 200),
                       output_tokens=(4, 32))
    warmup = chat_calls(min(WARMUP, max(8, n)), ctx.seed + 1, prompt_words=(8, 200),
                        output_tokens=(2, 8))
    # modelfleet's own defaults for the stall deadline: the bench's usual 1 s floor would
    # make a 1 s stall a failed attempt and a retry, which is not what this measures.
    tuning = replace(ctx.tuning, probe_interval_s=5.0, request_timeout_s=10.0,
                     stall_timeout_s=5.0)
    outcome = Outcome(
        "tail",
        f"{SERVERS} equal chat sims (`--speed {SPEED:g}`), each with the stall fault "
        f"`{{\"stall_fraction\": {STALL['stall_fraction']}, \"stall_s\": {STALL['stall_s']:g}}}`"
        f" (a random 5 % of requests silent 1 s before their first token); open loop at "
        f"{n / duration:.0f} requests/s for {duration:g} s, half whole answers (max_tokens) and "
        f"half streams, prompts 8-200 words, answers 4-32 tokens; {len(warmup)} unrecorded "
        f"warm-up requests per contender. modelfleet is peak_ewma with routing.hedge_after off, "
        f"auto and {FIXED_S:g} s (hedge_budget 0.05, the default); the oracle routes on the sims' "
        f"true state and drops a request the moment its stall starts.")
    table = Table("tail: 5 % of requests stall 1 s",
                  ["contender", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors",
                   "server load", "p50 / off", "p99 / off", "load / off"])
    rows: dict[str, dict[str, Any]] = {}
    plans = [ServerPlan(MODEL, speed=SPEED, flags={"seed": i}) for i in range(SERVERS)]
    async with ctx.fleet(plans) as fleet:  # (own seeds: each stalls its own 5 %)
        servers = tuple(s.address for s in fleet.servers)
        target = Target(MODEL, "chat", servers, tuning, fleet)
        for label, contender in contenders():
            ctx.progress.line(f"tail: {label} ({n} requests)")
            result = await _one(ctx, fleet, target, contender, calls, warmup, label)
            await fleet.reset()
            if result is not None:
                rows[label] = result
    off = rows.get("hedging off", {})
    for label, row in rows.items():
        p50, p99, load = (ratio(row["p50_s"], off.get("p50_s", float("nan"))),
                          ratio(row["p99_s"], off.get("p99_s", float("nan"))),
                          ratio(row["load"], off.get("load", float("nan"))))
        row.update(p50_vs_off=p50, p99_vs_off=p99, load_vs_off=load)
        table.rows.append([label, ms(row["p50_s"]), ms(row["p99_s"]), ms(row["p999_s"]),
                           ms(row["max_s"]), str(row["errors"]), times(row["load"]),
                           times(p50), times(p99), times(load)])
    table.notes.append(f"{n} requests per contender. server load: the sims' chat requests "
                       "(those whose client left included: status 499) over the requests sent. "
                       "Targets for auto: p99 <= 0.3x off, p50 <= 1.1x, load <= 1.1x.")
    for label, row in rows.items():
        if row.get("hedges"):
            table.notes.append(f"{label}: hedges {row['hedges']}")
    outcome.tables.append(table)
    outcome.data = rows
    return outcome


async def _one(ctx: Context, fleet: SimFleet, target: Target, contender: Contender,
               calls: list[ChatCall], warmup: list[ChatCall], label: str) -> dict | None:
    """One contender's run: warm-up, the sims' request counters around the run, the load."""
    started = time.monotonic()
    try:
        await contender.open(target)
        await fleet_fault(fleet)
        await warm_up(contender, warmup)
        before = await _served(fleet)

        async def send(call: ChatCall, t0: float) -> Sample:
            return await timed("stream" if call.index % 2 else "chat", contender, call, t0)

        samples, _ = await open_loop(send, calls, drain_s=target.tuning.request_timeout_s * 2)
        await asyncio.sleep(0.2)  # losers' cancellations reach the sims' counters
        served = await _served(fleet) - before
        hedges = _hedges(contender)
    except Exception as exc:  # one broken contender must not cost the run its results
        ctx.failed(f"tail: {label}", exc)
        return None
    finally:
        await contender.close()
    ctx.progress.line(f"  {label}: done in {time.monotonic() - started:.1f}s")
    summary = latency_summary(samples)
    summary.update(load=served / max(1, len(samples)), served=served, hedges=hedges)
    return summary


async def fleet_fault(fleet: SimFleet) -> None:
    await asyncio.gather(*(fleet.fault(s, **STALL) for s in fleet.servers))


async def _served(fleet: SimFleet) -> float:
    """Chat requests the sims have seen, every status."""
    from modelfleet.testing import metric_value

    async def one(server: Any) -> float:
        async with fleet.session.get(f"{server.url}/metrics") as r:
            return metric_value(await r.text(), "http_requests_total", {"handler": CALLS})

    return sum(await asyncio.gather(*(one(s) for s in fleet.servers)))


def _hedges(contender: Contender) -> dict[str, int]:
    """The client's own hedge counts (status()), where it has them."""
    client = getattr(contender, "_client", None)
    route = getattr(client, "_routes", {}).get(MODEL) if client is not None else None
    hedging = getattr(route, "hedging", None)
    if hedging is None:
        return {}
    learnt = {server.rsplit(":", 1)[-1]: [round(1000 * (times.quantile(q) or 0), 1)
                                          for q in (0.5, 0.9, 0.95, 0.99)]
              for server, times in hedging.times.items()}
    return {**hedging.counts, "ttft_ms_p50_p90_p95_p99": learnt}

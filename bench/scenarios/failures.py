"""Servers that fail: killed, hanging, or answering 500 to half their requests.

Three runs per contender, one fault each, on four equal servers under open-loop load: a third
of the way in, server 0 is SIGKILLed, or starts hanging (accepts requests and never answers),
or starts failing half its requests with a 500. The fault stays to the end. What counts is what
the caller saw: failed requests (the target for modelfleet is zero), and the p99 of requests
sent after the fault (a hung server costs whatever the router's deadline is).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from bench.contenders import Target
from bench.contenders.base import timed
from bench.fleet import ServerPlan
from bench.measure import Sample, percentile
from bench.scenarios.base import Context, Outcome, Table, latency_summary, ms, with_contender
from bench.workload import ChatCall, chat_calls, open_loop

SPEED = 2.0
RATE_PER_S = 40.0
MODEL = "chat-failures"
FAULTS = ("killed", "hanging", "500 on half")


async def run(ctx: Context) -> Outcome:
    duration = ctx.scale.seconds(full=4.5, quick=2.4)
    fault_at = duration / 3
    # A few times the longest answer here (~0.7 s): what a user would give this fleet.
    tuning = replace(ctx.tuning, request_timeout_s=4.0)
    names = [n for n in ctx.contenders if n != "raw-aiohttp"]
    n = ctx.scale.n(full=int(duration * RATE_PER_S), quick=int(duration * RATE_PER_S))
    calls = chat_calls(n, ctx.seed, rate_per_s=n / duration)
    outcome = Outcome(
        "failures",
        f"Four equal chat sims (`--speed {SPEED:g}`), open loop at {n / duration:.0f} requests/s "
        f"for {duration:g} s; at {fault_at:.1f} s server 0 is SIGKILLed, or hangs "
        f"(`{{\"hang\": true}}`), or fails half its requests (`{{\"error_rate\": 0.5, "
        f"\"error_status\": 500}}`), one fault per run, kept to the end. Every router gets "
        f"request_timeout_s={tuning.request_timeout_s:g}, {tuning.max_retry} attempts; "
        f"modelfleet's stall deadline floor is {tuning.stall_timeout_s:g} s (LiteLLM has "
        f"only the whole-request timeout).")
    table = Table("failures: errors seen by the caller",
                  ["fault", "contender", "caller errors", "p50 ms", "p99 ms",
                   "p99 after fault ms", "max ms"])
    drain = tuning.request_timeout_s * 2.5
    async with ctx.fleet([ServerPlan(MODEL, speed=SPEED) for _ in range(4)]) as fleet:
        servers = tuple(s.address for s in fleet.servers)
        victim = fleet.servers[0]
        target = Target(MODEL, "chat", servers, tuning, fleet)
        warmup = chat_calls(8, ctx.seed + 1, output_tokens=(2, 8))

        async def kill() -> None:
            victim.kill()

        async def hang() -> None:
            await fleet.fault(victim, hang=True)

        async def errors() -> None:
            await fleet.fault(victim, error_rate=0.5, error_status=500)

        for fault, action in zip(FAULTS, (kill, hang, errors), strict=True):
            ctx.progress.line(f"failures: server 0 {fault}")
            outcome.data[fault] = {}
            outcome.cdfs[f"failures-{fault.replace(' ', '-')}"] = {}
            for name in names:
                async def body(contender, action=action):
                    async def send(call: ChatCall, t0: float) -> Sample:
                        return await timed("chat", contender, call, t0)

                    samples, _ = await open_loop(send, calls, drain_s=drain,
                                                 timeline=[(fault_at, action)])
                    return samples

                samples = await with_contender(ctx, name, target, body, warmup=warmup,
                                               label=f"{fault}: ")
                await fleet.reset()
                if samples is None:
                    continue
                summary = latency_summary(samples)
                after = [s.latency_s for s in samples if s.ok and s.start_s >= fault_at]
                kinds = Counter((s.error or "").split(":")[0] for s in samples if not s.ok)
                summary.update(p99_after_fault_s=percentile(after, 99), error_kinds=dict(kinds))
                outcome.data[fault][name] = summary
                table.rows.append([fault, name, str(summary["errors"]), ms(summary["p50_s"]),
                                   ms(summary["p99_s"]), ms(summary["p99_after_fault_s"]),
                                   ms(summary["max_s"])])
                outcome.cdfs[f"failures-{fault.replace(' ', '-')}"][name] = [
                    s.latency_s for s in samples if s.ok]
                if kinds:
                    example = next(s.error for s in samples if not s.ok)
                    table.notes.append(f"{fault} / {name}: {sum(kinds.values())} errors "
                                       f"({', '.join(f'{k} x{v}' for k, v in kinds.items())}); "
                                       f"first: {example}")
    table.notes.insert(0, f"{n} requests per contender and fault. Target: 0 caller errors for "
                          f"modelfleet; a hung request costs about its router's deadline.")
    outcome.tables.append(table)
    return outcome

"""A chaos soak (issue 15): faults rotating over a fleet while callers keep asking.

Four equal chat sims; eight concurrent callers in a closed loop, each request a whole answer
(`chat` with max_tokens) or a stream (`chat_stream`), half and half. Every few seconds one or
two servers get a random fault for a while, then are healed: a hang, 500 on half the
requests, a 10x slowdown, a connection dropped after a few tokens, or a SIGKILL (the
server is restarted on its port when healed). modelfleet's own client only: the question is
whether a caller ever sees one of these faults.

Every answer is checked word for word: the sims share a seed, so the reply to a prompt is
known in advance (`modelfleet.sim.content`), and a continued stream must give exactly it,
nothing repeated or lost. Reported: caller errors (target 0; a wrong text counts as one),
requests served, continued streams, latency; and the client's open file descriptors,
asyncio tasks and RSS sampled through the run (target: flat, not growing with the run).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from bench.fleet import ServerPlan, SimFleet, SimServer
from bench.measure import percentile
from bench.scenarios.base import Context, Outcome, Table, ms
from bench.workload import ChatCall, chat_calls
from modelfleet.client import AsyncModelServer
from modelfleet.config import FleetConfig, ModelSpec, RoutingSpec, ServerSpec
from modelfleet.sim import content

SPEED = 4.0
SERVERS = 4
CALLERS = 8
MODEL = "chat-chaos"
FAULT_S = 2.0  # how long a fault lasts
CALM_S = 1.0  # between healing and the next fault
SAMPLE_S = 0.25  # resource sampling period
FAULTS: dict[str, dict] = {
    "hang": {"hang": True},
    "500 on half": {"error_rate": 0.5, "error_status": 500},
    "10x slower": {"slowdown": 10.0},
    "disconnect after 3 tokens": {"disconnect_after_tokens": 3},
    "SIGKILL": {},  # killed, restarted when healed
}


@dataclass
class Tally:
    """What the callers saw, and what the chaos did."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"whole": [], "stream": []})
    errors: Counter[str] = field(default_factory=Counter)
    first_error: str | None = None
    continued: int = 0  # streams that moved at least once
    moves: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)  # t, fds, tasks, MB

    def failed(self, what: str) -> None:
        self.errors[what.split(":")[0]] += 1
        self.first_error = self.first_error or what


def expected_text(call: ChatCall) -> str:
    """The reply every sim of the fleet gives (seed 0, the sims' default)."""
    prompt, _ = content.chat_prompt(call.messages)
    return "".join(content.reply_pieces(0, prompt, call.max_tokens, leading_space=False)[0])


def resources() -> tuple[int, int, float]:
    """This process's open file descriptors, asyncio tasks and resident memory (MB)."""
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        fds = -1
    try:
        import psutil

        rss = psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:  # pragma: no cover - psutil is a dependency
        rss = float("nan")
    return fds, len(asyncio.all_tasks()), rss


async def run(ctx: Context) -> Outcome:
    duration = ctx.scale.box(full=40.0, quick=12.0) or 4.0
    tuning = replace(ctx.tuning, request_timeout_s=6.0)
    outcome = Outcome(
        "chaos",
        f"{SERVERS} equal chat sims (`--speed {SPEED:g}`), {CALLERS} callers in a closed loop "
        f"for {duration:g} s, half whole answers (`chat`, max_tokens) and half streams "
        f"(`chat_stream`); every {FAULT_S + CALM_S:g} s one or two random servers get a "
        f"random fault for {FAULT_S:g} s ({', '.join(FAULTS)}; a killed server is restarted "
        f"when healed). modelfleet:peak_ewma with request_timeout_s="
        f"{tuning.request_timeout_s:g}, stall floor {tuning.stall_timeout_s:g} s, "
        f"{tuning.max_retry} attempts, continue_streams on. Every text is checked against the "
        f"sims' known reply.")
    tally = Tally()
    calls = chat_calls(4096, ctx.seed, prompt_words=(8, 200), output_tokens=(4, 64))
    expected = {call.index: expected_text(call) for call in calls}
    async with ctx.fleet([ServerPlan(MODEL, speed=SPEED) for _ in range(SERVERS)]) as fleet:
        servers = tuple(ServerSpec(host=s.host, port=s.port) for s in fleet.servers)
        config = FleetConfig(
            models={MODEL: ModelSpec(name=MODEL, servers=servers, backend="sim")},
            routing=RoutingSpec(max_retry=tuning.max_retry,
                                request_timeout_s=tuning.request_timeout_s,
                                probe_interval_s=tuning.probe_interval_s,
                                stall_timeout_s=tuning.stall_timeout_s))
        ctx.progress.line(f"chaos: {duration:g} s of faults under {CALLERS} callers")
        async with AsyncModelServer(config=config, seed=ctx.seed) as client:
            for call in calls[:8]:  # warm-up: first benchmarks, pools filled
                await client.chat(MODEL, call.messages, max_tokens=call.max_tokens)
            served = await _soak(ctx, fleet, client, calls[8:], expected, duration, tally)
            gc.collect()
            idle = resources()
        await fleet.reset()
    _report(outcome, tally, served, duration, idle)
    return outcome


async def _soak(ctx: Context, fleet: SimFleet, client: AsyncModelServer, calls: list[ChatCall],
                expected: dict[int, str], duration: float, tally: Tally) -> int:
    """Callers, chaos and the sampler for `duration` seconds; returns requests served."""
    started = time.perf_counter()
    stop_at = started + duration
    served = 0
    rng = random.Random(ctx.seed)
    queue = itertools.count()

    async def caller(number: int) -> None:
        nonlocal served
        picks = random.Random(ctx.seed * 100 + number)
        while time.perf_counter() < stop_at:
            call = calls[next(queue) % len(calls)]
            stream = picks.random() < 0.5
            t0 = time.perf_counter()
            try:
                if stream:
                    answer = client.chat_stream(MODEL, call.messages, max_tokens=call.max_tokens)
                    text = "".join([piece async for piece in answer])
                    if answer.continuations:
                        tally.continued += 1
                        tally.moves += answer.continuations
                else:
                    text = (await client.chat(MODEL, call.messages,
                                              max_tokens=call.max_tokens)).text
            except Exception as exc:  # what the caller would see
                tally.failed(f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            if text != expected[call.index]:
                tally.failed(f"wrong text: {text!r} for {expected[call.index]!r}")
                continue
            served += 1
            tally.latencies["stream" if stream else "whole"].append(time.perf_counter() - t0)

    deck: list[str] = []  # the faults dealt from a shuffled deck: every kind comes up

    async def chaos() -> None:
        while time.perf_counter() + FAULT_S < stop_at:
            await asyncio.sleep(CALM_S)
            victims = rng.sample(fleet.servers, rng.choice((1, 2)))
            hurt: list[tuple[SimServer, str]] = []
            for server in victims:
                if not deck:
                    deck.extend(rng.sample(list(FAULTS), len(FAULTS)))
                name = deck.pop()
                tally.faults[name] += 1
                if name == "SIGKILL":
                    server.kill()
                else:
                    await fleet.fault(server, **FAULTS[name])
                hurt.append((server, name))
            await asyncio.sleep(FAULT_S)
            for server, name in hurt:  # healed; a restart runs while the callers go on
                if name == "SIGKILL":
                    await fleet.restart(server)
                else:
                    await fleet.fault(server, reset=True)

    async def sampler() -> None:
        while True:
            fds, tasks, rss = resources()
            tally.samples.append((time.perf_counter() - started, fds, tasks, rss))
            await asyncio.sleep(SAMPLE_S)

    sampling = asyncio.ensure_future(sampler())
    try:
        await asyncio.gather(chaos(), *(caller(i) for i in range(CALLERS)))
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    return served


def _report(outcome: Outcome, tally: Tally, served: int, duration: float,
            idle: tuple[int, int, float]) -> None:
    every = tally.latencies["whole"] + tally.latencies["stream"]
    errors = sum(tally.errors.values())
    callers = Table("chaos: what the callers saw",
                    ["requests served", "whole / streams", "caller errors", "streams continued",
                     "p50 ms", "p99 ms", "max ms"])
    callers.rows.append([str(served), f"{len(tally.latencies['whole'])} / "
                                      f"{len(tally.latencies['stream'])}",
                         str(errors), f"{tally.continued} ({tally.moves} moves)",
                         ms(percentile(every, 50)), ms(percentile(every, 99)),
                         ms(max(every) if every else float("nan"))])
    callers.notes.append("Faults applied: " + ", ".join(f"{name} x{n}" for name, n in
                                                       sorted(tally.faults.items())) + ".")
    if tally.errors:
        callers.notes.append(f"Errors: {dict(tally.errors)}; first: {tally.first_error}")
    quarter = max(1, len(tally.samples) // 4)
    first, last = tally.samples[:quarter], tally.samples[-quarter:]

    def median(rows: list[tuple[float, int, int, float]], column: int) -> float:
        return statistics.median(row[column] for row in rows) if rows else float("nan")

    resources_table = Table("chaos: the client process over the run",
                            ["resource", "first quarter (median)", "last quarter (median)",
                             "growth", "max", "after the run (idle)"])
    growth: dict[str, float] = {}
    for column, name, fmt, at_rest in ((1, "open file descriptors", "{:.0f}", idle[0]),
                                       (2, "asyncio tasks", "{:.0f}", idle[1]),
                                       (3, "RSS MB", "{:.1f}", idle[2])):
        a, b = median(first, column), median(last, column)
        growth[name] = b - a
        top = max((row[column] for row in tally.samples), default=float("nan"))
        resources_table.rows.append([name, fmt.format(a), fmt.format(b), fmt.format(b - a),
                                     fmt.format(top), fmt.format(at_rest)])
    resources_table.notes.append(
        f"{len(tally.samples)} samples, every {SAMPLE_S:g} s, of the bench process (the client, "
        f"its {CALLERS} callers and the chaos task; the sims are other processes). Flat: "
        f"the last quarter's medians equal the first's.")
    outcome.tables += [callers, resources_table]
    outcome.data = {
        "duration_s": duration, "served": served, "errors": errors,
        "error_kinds": dict(tally.errors), "first_error": tally.first_error,
        "whole": len(tally.latencies["whole"]), "streams": len(tally.latencies["stream"]),
        "streams_continued": tally.continued, "moves": tally.moves,
        "p50_s": percentile(every, 50), "p99_s": percentile(every, 99),
        "max_s": max(every) if every else None, "faults": dict(tally.faults),
        "growth": growth, "idle": {"fds": idle[0], "tasks": idle[1], "rss_mb": idle[2]},
        "samples": [list(row) for row in tally.samples],
    }


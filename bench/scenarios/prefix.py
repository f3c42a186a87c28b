"""Prefix-cache-aware routing (issue 13): a cache hit is a shorter prefill.

Four sims with a KV cache too small for every group's system prompt on every server
(`--kv-cache-tokens`) and prefill as a shared per-step budget (`--max-num-batched-tokens`),
so a prompt computed in full slows every request on its server. The workload
(`bench.conversations`): groups of users behind one long system prompt, in conversations that
grow turn by turn; then the same with one group carrying 80% of the conversations (a hot
prefix, which must spill off its home server). Closed loop, every contender for the same
seconds on freshly started sims: no contender finds a cache another one filled.

Reported per contender: time to first token (streams), output tokens per second, the fleet's
prefix-cache hit ratio as the sims count it (the delta of their hit and query counters over
the run, in tokens) and each server's share of the requests; then the issue's targets as
ratios measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.contenders import (
    PREFIX_CLIENTS,
    PREFIX_OFF,
    PREFIX_ON,
    Target,
    Unavailable,
    build,
)
from bench.contenders.base import timed
from bench.conversations import Shape, Turn, conversation, converse
from bench.fleet import ServerPlan, SimFleet
from bench.measure import Sample, percentile, ratio
from bench.scenarios.base import (
    Bars,
    Context,
    Outcome,
    Table,
    ms,
    pct,
    times,
    warm_up,
    with_contender,
)
from bench.workload import chat_calls

SPEED = 2.0
SERVERS = 4
KV_CACHE_TOKENS = 12_000  # estimated tokens: ~5 of the 16 system prompts fit, with room to run
MAX_BATCHED_TOKENS = 512  # prompt tokens one engine step computes (vLLM's chunked prefill)
MAX_MODEL_LEN = 4096
CONCURRENCY = 32
PROCESSES = 8  # the independent-clients contender: CONCURRENCY / PROCESSES users each
MODEL = "chat-prefix"
VARIANTS = (("shared", Shape()), ("hot", Shape(hot_share=0.8)))
START_TIMEOUT_S = 120.0
ROUND_ROBIN = "modelfleet:round_robin"
ORACLE = "oracle"


@dataclass
class Run:
    """One contender's run: what its callers saw and what the sims counted meanwhile."""

    samples: list[Sample]
    wall_s: float
    servers: tuple[str, ...]
    hits: int
    queries: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.queries if self.queries else float("nan")

    def ttfts(self) -> list[float]:
        return [s.ttft_s if s.ttft_s is not None else s.latency_s for s in self.samples if s.ok]

    def ttft(self, q: float) -> float:
        return percentile(self.ttfts(), q)

    @property
    def tokens_per_s(self) -> float:
        tokens = sum(s.items for s in self.samples if s.ok)
        return tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def shares(self) -> list[float]:
        """Each server's share of the answered requests, busiest first (fresh sims per run:
        a server has no identity across contenders)."""
        answered = [s.server for s in self.samples if s.ok and s.server]
        counts = sorted((answered.count(a) for a in self.servers), reverse=True)
        return [c / len(answered) for c in counts] if answered else []


def plans() -> list[ServerPlan]:
    return [ServerPlan(MODEL, speed=SPEED, kv_cache_tokens=KV_CACHE_TOKENS,
                       max_num_batched_tokens=MAX_BATCHED_TOKENS,
                       flags={"max_model_len": MAX_MODEL_LEN}) for _ in range(SERVERS)]


async def counters(fleet: SimFleet) -> tuple[int, int]:
    """The fleet's prefix-cache hits and queries so far (tokens, summed over the sims)."""
    states = await asyncio.gather(*(fleet.state(s) for s in fleet.servers))
    return (sum(int(st.get("prefix_cache_hits", 0)) for st in states),
            sum(int(st.get("prefix_cache_queries", 0)) for st in states))


def _warmup(ctx: Context) -> list:
    return chat_calls(8, ctx.seed + 1, prompt_words=(4, 16), output_tokens=(2, 8))


async def _send(contender, turn: Turn, t0: float, worker: int = 0) -> Sample:
    sample = await timed("stream", contender, turn, t0, worker=worker)
    return dataclasses.replace(sample, items=turn.output_tokens if sample.ok else 0)


async def _run_one(ctx: Context, name: str, fleet: SimFleet, shape: Shape, variant: str,
                   duration: float | None) -> Run | None:
    servers = tuple(s.address for s in fleet.servers)
    target = Target(MODEL, "chat", servers, ctx.tuning, fleet)

    async def body(contender) -> Run:
        before = await counters(fleet)
        samples, wall = await converse(lambda turn, t0: _send(contender, turn, t0), shape,
                                       ctx.seed, itertools.count(), CONCURRENCY,
                                       duration_s=duration, max_turns=ctx.scale.requests)
        after = await counters(fleet)
        return Run(samples, wall, servers, after[0] - before[0], after[1] - before[1])

    return await with_contender(ctx, name, target, body, warmup=_warmup(ctx), label=f"{variant} ")


# ---- eight independent client processes -------------------------------------------------------


def _child(worker: int, target: Target, shape: Shape, seed: int, duration: float | None,
           max_turns: int | None, warmup: list, ready, go, results) -> None:
    try:
        samples = asyncio.run(_child_async(worker, target, shape, seed, duration, max_turns,
                                           warmup, ready, go))
        results.put((worker, samples, None))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # the parent must hear about it, not wait for a timeout
        with contextlib.suppress(Exception):
            ready.put(worker)
        results.put((worker, [], f"{type(exc).__name__}: {exc}"))


async def _child_async(worker: int, target: Target, shape: Shape, seed: int,
                       duration: float | None, max_turns: int | None, warmup: list, ready,
                       go) -> list[Sample]:
    """One client process: its own peak_ewma+prefix client, every PROCESSES-th conversation."""
    contender = build(PREFIX_ON)
    try:
        await contender.open(target)
        await warm_up(contender, warmup)
        _prepare(shape, seed, duration, max_turns and max_turns * PROCESSES, worker, PROCESSES)
        ready.put(worker)
        if not await asyncio.to_thread(go.wait, START_TIMEOUT_S):
            raise TimeoutError("the start signal never came")
        samples, _ = await converse(lambda turn, t0: _send(contender, turn, t0, worker), shape,
                                    seed, itertools.count(worker, PROCESSES),
                                    CONCURRENCY // PROCESSES, duration_s=duration,
                                    max_turns=max_turns)
        return samples
    finally:
        await contender.close()


async def _run_clients(ctx: Context, fleet: SimFleet, shape: Shape, variant: str,
                       duration: float | None) -> Run | None:
    from bench.scenarios.herd import _process_context

    name = PREFIX_CLIENTS
    servers = tuple(s.address for s in fleet.servers)
    target = Target(MODEL, "chat", servers, ctx.tuning)
    requests = ctx.scale.requests
    processes = _process_context()
    ready, results, go = processes.Queue(), processes.Queue(), processes.Event()
    procs = [processes.Process(target=_child, daemon=True, args=(
        w, target, shape, ctx.seed, duration,
        None if requests is None else requests // PROCESSES + (w < requests % PROCESSES),
        _warmup(ctx), ready, go, results)) for w in range(PROCESSES)]
    ctx.progress.line(f"  {variant} {name}: starting {PROCESSES} client processes")
    samples: list[Sample] = []
    failures: list[str] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            await asyncio.to_thread(ready.get, True, START_TIMEOUT_S)
        before = await counters(fleet)
        started = time.perf_counter()
        go.set()
        for _ in procs:
            worker, got, error = await asyncio.to_thread(results.get, True, START_TIMEOUT_S)
            samples += got
            if error:
                failures.append(f"process {worker}: {error}")
        wall = time.perf_counter() - started
        if duration is not None and requests is None:
            wall = duration  # the box, as for one client (the processes' cut-off)
        after = await counters(fleet)
    except queue.Empty:
        failures.append(f"a client process did not report within {START_TIMEOUT_S:.0f}s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    for failure in failures:
        ctx.skip(name, f"{variant}: {failure}")
    if failures or not samples:
        return None
    ctx.progress.line(f"  {variant} {name}: done, {len(samples)} requests")
    return Run(samples, wall, servers, after[0] - before[0], after[1] - before[1])


# ---- the scenario -----------------------------------------------------------------------------


def _prepare(shape: Shape, seed: int, duration: float | None, requests: int | None,
             first: int = 0, step: int = 1) -> None:
    """Build the conversations a run will likely reach before it starts (they are cached), so
    that no contender's box pays for building them: the fastest single client gets through
    about 25 conversations a second. A client process builds its own share (`first`, `step`)."""
    count = CONCURRENCY + (int(30 * duration) if duration is not None
                           else -(-(requests or 0) // shape.turns))
    for index in range(first, min(count, 6000), step):
        conversation(shape, seed, index)


def _available(ctx: Context, name: str) -> bool:
    """Whether `name` can run here, found before any sims start for it (and, for the eight
    processes, once rather than in each)."""
    try:
        build(PREFIX_ON if name == PREFIX_CLIENTS else name)
    except Unavailable as exc:
        ctx.skip(name, str(exc))
        return False
    return True


async def run(ctx: Context) -> Outcome:
    names = [n for n in ctx.prefix_contenders if _available(ctx, n)]
    duration = ctx.scale.box(full=15.0, quick=4.0)
    box = (f"{duration:g} s per contender" if duration is not None
           else f"{ctx.scale.requests} requests per contender")
    outcome = Outcome(
        "prefix",
        f"{SERVERS} chat sims (`--speed {SPEED:g} --kv-cache-tokens {KV_CACHE_TOKENS} "
        f"--max-num-batched-tokens {MAX_BATCHED_TOKENS}`), started afresh for every contender; "
        f"closed loop, {CONCURRENCY} users each sending its conversation's turns one after "
        f"another (streamed), {box}. Workload: {VARIANTS[0][1].describe()}. Hot variant: the "
        f"same with group 0 carrying {VARIANTS[1][1].hot_share:.0%} of the conversations. The "
        f"independent-clients contender is {PROCESSES} processes, each its own "
        f"{PREFIX_ON} client with {CONCURRENCY // PROCESSES} users (every {PROCESSES}th "
        f"conversation), never talking to each other.")
    if not names:
        outcome.notes.append("No contender of the prefix scenario was selected (--contenders).")
        return outcome
    runs: dict[str, dict[str, Run]] = {}
    for variant, shape in VARIANTS:
        ctx.progress.line(f"prefix {variant}: {box}")
        _prepare(shape, ctx.seed, duration, ctx.scale.requests)
        runs[variant] = {}
        for name in names:
            async with ctx.fleet(plans()) as fleet:  # fresh sims: empty caches, counters at 0
                if name == PREFIX_CLIENTS:
                    got = await _run_clients(ctx, fleet, shape, variant, duration)
                else:
                    got = await _run_one(ctx, name, fleet, shape, variant, duration)
            if got is not None:
                runs[variant][name] = got
        _tabulate(outcome, variant, runs[variant])
    outcome.tables.append(_targets(outcome, runs))
    return outcome


def _tabulate(outcome: Outcome, variant: str, runs: dict[str, Run]) -> None:
    off = runs.get(PREFIX_OFF)
    rr = runs.get(ROUND_ROBIN)
    oracle = runs.get(ORACLE)
    nan = float("nan")
    workload = "one hot prefix (80% of conversations)" if variant == "hot" else "shared prefixes"
    table = Table(f"prefix, {workload}",
                  ["contender", "requests", "TTFT p50 ms", "p90 ms", "p99 ms", "output tok/s",
                   "hit ratio", "share per server", "errors", "p90 / noprefix",
                   "p90 / round_robin", "p99 / round_robin", "tok/s / round_robin",
                   "hit / oracle"])
    data = {}
    for name, r in runs.items():
        p50, p90, p99 = r.ttft(50), r.ttft(90), r.ttft(99)
        errors = sum(1 for s in r.samples if not s.ok)
        row = {"requests": len(r.samples), "errors": errors, "ttft_p50_s": p50, "ttft_p90_s": p90,
               "ttft_p99_s": p99, "output_tokens_per_s": r.tokens_per_s,
               "hit_ratio": r.hit_ratio, "hit_tokens": r.hits, "query_tokens": r.queries,
               "shares": r.shares(), "wall_s": r.wall_s,
               "p90_vs_noprefix": ratio(p90, off.ttft(90) if off else nan),
               "p90_vs_round_robin": ratio(p90, rr.ttft(90) if rr else nan),
               "p99_vs_round_robin": ratio(p99, rr.ttft(99) if rr else nan),
               "tokens_per_s_vs_round_robin": ratio(r.tokens_per_s, rr.tokens_per_s if rr else nan),
               "hit_vs_oracle": ratio(r.hit_ratio, oracle.hit_ratio if oracle else nan)}
        data[name] = row
        table.rows.append([name, str(len(r.samples)), ms(p50), ms(p90), ms(p99),
                           f"{r.tokens_per_s:.0f}", pct(r.hit_ratio),
                           " / ".join(f"{x * 100:.0f}" for x in r.shares()) or "—", str(errors),
                           times(row["p90_vs_noprefix"]), times(row["p90_vs_round_robin"]),
                           times(row["p99_vs_round_robin"]),
                           times(row["tokens_per_s_vs_round_robin"]), times(row["hit_vs_oracle"])])
    table.notes.append("TTFT: to the first streamed token, answered requests only. Hit ratio: "
                       "the sims' own counters (prefix-cache hit tokens / queried tokens, the "
                       "delta over the run, all servers). Share per server: % of the requests, "
                       "busiest server first.")
    outcome.tables.append(table)
    outcome.data[variant] = data
    outcome.cdfs[f"prefix-{variant}-ttft"] = {name: r.ttfts() for name, r in runs.items()}
    outcome.bars[f"prefix-{variant}-share"] = Bars(
        f"prefix ({variant}): share of requests per server, busiest first; hit ratio at the right",
        {name: r.shares() for name, r in runs.items()},
        {name: f"hit {pct(r.hit_ratio)}" for name, r in runs.items()})


def _targets(outcome: Outcome, runs: dict[str, dict[str, Run]]) -> Table:
    """The issue's targets, each as a ratio measured in this run, beside what it must be."""
    nan = float("nan")

    def metric(variant: str, name: str, what: str) -> float:
        r = runs.get(variant, {}).get(name)
        if r is None:
            return nan
        return {"p90": r.ttft(90), "p99": r.ttft(99), "tok/s": r.tokens_per_s,
                "hit": r.hit_ratio}[what]

    rows: Sequence[tuple[str, str, str, str, str, str, float, bool]] = (
        ("TTFT p90 vs peak_ewma without prefix awareness", "shared", "p90", PREFIX_ON, PREFIX_OFF,
         "<=", 0.5, False),
        ("TTFT p90 vs round_robin", "shared", "p90", PREFIX_ON, ROUND_ROBIN, "<=", 0.5, False),
        ("output tokens/s vs round_robin", "shared", "tok/s", PREFIX_ON, ROUND_ROBIN, ">=", 1.3,
         False),
        ("hit ratio vs the oracle's", "shared", "hit", PREFIX_ON, ORACLE, ">=", 0.8, False),
        ("hot prefix: TTFT p99 vs round_robin", "hot", "p99", PREFIX_ON, ROUND_ROBIN, "<=", 1.0,
         False),
        ("8 independent clients: hit ratio vs one client's", "shared", "hit", PREFIX_CLIENTS,
         PREFIX_ON, ">=", 0.9, False),
        ("8 independent clients, hot prefix: hit ratio vs one client's", "hot", "hit",
         PREFIX_CLIENTS, PREFIX_ON, ">=", 0.9, True),
    )
    table = Table("prefix: targets (issue 13), as ratios of this run",
                  ["target", "workload", "contender", "baseline", "measured", "needed", "met"])
    for label, variant, what, name, base, op, bound, extra in rows:
        value = ratio(metric(variant, name, what), metric(variant, base, what))
        if math.isnan(value):
            met = "—"
        else:
            met = "yes" if (value <= bound if op == "<=" else value >= bound) else "no"
        table.rows.append([label + (" (beyond the issue)" if extra else ""), variant, name, base,
                           times(value), f"{op} {bound:g}x", met])
        outcome.data.setdefault("targets", []).append(
            {"target": label, "workload": variant, "contender": name, "baseline": base,
             "ratio": value, "needed": f"{op} {bound:g}", "met": None if met == "—" else met == "yes"})
    if any(row[-1] == "—" for row in table.rows):
        table.notes.append(f"—: a contender of the ratio did not run (skipped: see the notes; "
                           f"{PREFIX_ON} needs the `prefix_aware` routing key of issue 13).")
    table.notes.append("Single runs on shared cores: read ratios near a bound as undecided.")
    return table

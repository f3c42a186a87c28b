"""Embedding throughput through the client against raw aiohttp, and base64 against float JSON.

Embedding pipelines are throughput jobs: the question is vectors per second, and how much of
it goes to turning JSON numbers back into floats. vLLM can send each vector as base64 float32
instead of a JSON list (`encoding_format`); modelfleet asks for base64 and decodes it. Here raw
aiohttp does both (float JSON parsed by aiohttp; base64 decoded into float lists), beside
modelfleet and LiteLLM (in its default format), on one zero-delay embedding sim with
1024-dimensional vectors, batches of 64, interleaved rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.contenders import Contender, Target, Unavailable, build
from bench.contenders.base import timed
from bench.contenders.raw import RawAiohttp
from bench.fleet import ServerPlan
from bench.measure import Sample, median
from bench.scenarios.base import Context, Outcome, Table, pct
from bench.workload import closed_loop, embedding_batches, steady_rate

ZERO_DELAY = 1e6
DIM = 1024
BATCH = 64
CONCURRENCY = 8
RAW_FLOAT = "raw-aiohttp (float JSON)"
RAW_B64 = "raw-aiohttp (base64)"


async def run(ctx: Context) -> Outcome:
    rounds = 1 if ctx.scale.requests or ctx.scale.quick else 3
    box_s = ctx.scale.seconds(full=1.5, quick=0.5)
    batches = embedding_batches(min(4000, ctx.scale.requests or 4000), BATCH, ctx.seed)
    outcome = Outcome(
        "embeddings",
        f"One zero-delay embedding sim, {DIM} dimensions; batches of {BATCH} texts, closed loop "
        f"at concurrency {CONCURRENCY}; " + (
            f"one round of exactly {ctx.scale.requests} batches." if ctx.scale.requests else
            f"{rounds} interleaved round(s) of {box_s:g} s each."))
    makers: dict[str, Callable[[], Contender]] = {
        RAW_FLOAT: lambda: RawAiohttp(RAW_FLOAT, "float"),
        RAW_B64: lambda: RawAiohttp(RAW_B64, "base64")}
    for family, preferred in (("modelfleet:", "modelfleet:peak_ewma"),
                              ("litellm:", "litellm:simple-shuffle")):
        chosen = [n for n in ctx.contenders if n.startswith(family)]
        if chosen:
            name = preferred if preferred in chosen else chosen[0]
            try:
                build(name)
                makers[name] = lambda name=name: build(name)
            except Unavailable as exc:
                ctx.skip(name, str(exc))
    contenders = list(makers)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    errors: dict[str, int] = dict.fromkeys(contenders, 0)
    sizes: dict[str, int] = {}
    async with ctx.fleet([ServerPlan("embed-wide", kind="embedding", speed=ZERO_DELAY,
                                    flags={"dim": DIM})]) as fleet:
        server = fleet.servers[0]
        target = Target("embed-wide", "embedding", (server.address,), ctx.tuning)
        for encoding in ("float", "base64"):  # what each format costs on the wire
            async with fleet.session.post(f"{server.url}/v1/embeddings", json={
                    "model": "embed-wide", "input": batches[0],
                    "encoding_format": encoding}) as response:
                sizes[encoding] = len(await response.read())
        for r in range(rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            ctx.progress.line(f"embeddings round {r + 1}/{rounds}: {', '.join(order)}")
            for name in order:
                if name not in contenders:
                    continue
                contender = makers[name]()  # opened for its own measurement only
                try:
                    await contender.open(target)
                    await _measure(contender, batches[:4], 2, None)
                    samples, rate = await _measure(contender, batches, CONCURRENCY,
                                                   None if ctx.scale.requests else box_s)
                except Exception as exc:  # noted in the report; the others still run
                    ctx.failed(f"embeddings {name}", exc)
                    contenders.remove(name)
                    continue
                finally:
                    await contender.close()
                rates[name].append(rate)
                errors[name] += sum(1 for s in samples if not s.ok)
    table = Table(f"embeddings: vectors per second ({DIM} dims, batches of {BATCH}, "
                  f"concurrency {CONCURRENCY})",
                  ["contender", "vectors/s", "vs raw float JSON", "vs raw base64", "errors"])
    for name in contenders:
        per_round = rates[name]
        vs_float = median([a / b for a, b in zip(per_round, rates[RAW_FLOAT], strict=False) if b])
        vs_b64 = median([a / b for a, b in zip(per_round, rates[RAW_B64], strict=False) if b])
        table.rows.append([name, f"{median(per_round) * BATCH:.0f}", pct(vs_float), pct(vs_b64),
                           str(errors[name])])
        outcome.data[name] = {"vectors_per_s": median(per_round) * BATCH,
                              "vs_raw_float": vs_float, "vs_raw_base64": vs_b64,
                              "errors": errors[name]}
    table.notes.append(f"One response of {BATCH} vectors: {sizes['float'] / 1024:.0f} KiB as float "
                       f"JSON, {sizes['base64'] / 1024:.0f} KiB as base64 "
                       f"({sizes['base64'] / sizes['float'] * 100:.0f}%). LiteLLM runs in its "
                       f"default format (asked for base64 it returns the strings undecoded).")
    outcome.data["response_bytes"] = sizes
    outcome.tables.append(table)
    return outcome


async def _measure(contender: Contender, batches: list[list[str]], concurrency: int,
                   box_s: float | None) -> tuple[list[Sample], float]:
    """Batches per second, steady state, of one time-boxed closed loop (see overhead)."""
    async def send(item: Any, t0: float) -> Sample:
        return await timed("embed", contender, item, t0)

    samples, wall = await closed_loop(send, batches, concurrency, deadline_s=box_s,
                                   min_done=4 * concurrency,
                                   max_s=None if box_s is None else 2 * box_s)
    return samples, steady_rate(samples, concurrency, wall)

"""What the client costs: modelfleet against raw aiohttp on a zero-delay server.

A sim at `--speed 1e6` answers without sleeping, so everything measured is client and HTTP
work. Raw aiohttp straight to the server is the floor. For chat, streaming (time to first
token) and embeddings (a batch of 64), at concurrency 1 and 64: added microseconds per request
at p50 and p99, and throughput as a fraction of raw aiohttp's. The targets (issues 4 and 7): at
least 90% of raw throughput at concurrency 64, under 200 µs added at p50, under 1 ms added to
the time to first token.

Measurements are short and interleaved: each round measures every contender once (in a rotated
order), and throughput ratios are taken within a round and then the median over rounds, so a
burst of load from elsewhere on the machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.contenders import RAW, Contender, Target, Unavailable, build
from bench.contenders.base import timed
from bench.fleet import ServerPlan
from bench.measure import Sample, median, percentile
from bench.scenarios.base import Context, Outcome, Table, ms, pct, us, warm_up
from bench.workload import ChatCall, closed_loop, embedding_batches, steady_rate

ZERO_DELAY = 1e6
CONCURRENCY = (1, 64)
OPS = ("chat", "stream", "embed")
EMBED_BATCH = 64
MAX_ITEMS = 20000  # per measurement; time-boxed well before this


def pick_contenders(selected: Sequence[str]) -> list[str]:
    """Raw aiohttp always (it is the floor), one modelfleet policy, one LiteLLM strategy.

    On a one-server fleet every policy and strategy does the same work but the choice itself;
    the default policy (peak_ewma) and LiteLLM's cheapest (simple-shuffle) stand for their
    families, which keeps the measurements per round few and so close together in time.
    """
    names = [RAW]
    for family, preferred in (("modelfleet:", "modelfleet:peak_ewma"),
                              ("litellm:", "litellm:simple-shuffle")):
        chosen = [n for n in selected if n.startswith(family)]
        if chosen:
            names.append(preferred if preferred in chosen else chosen[0])
    return names


async def run(ctx: Context) -> Outcome:
    names = pick_contenders(ctx.contenders)
    rounds = 1 if ctx.scale.requests or ctx.scale.quick else 3
    box_s = ctx.scale.seconds(full=1.0, quick=0.4)
    outcome = Outcome(
        "overhead",
        f"One zero-delay chat sim and one zero-delay embedding sim (`--speed {ZERO_DELAY:g}`, "
        f"384 dims). Chat: a 16-word prompt, max_tokens 16; streaming: the same, timed to the "
        f"first text piece; embeddings: batches of {EMBED_BATCH} short texts (raw aiohttp asks "
        f"for base64 and decodes it, as modelfleet does). " + (
            f"One round of exactly {ctx.scale.requests} requests per measurement."
            if ctx.scale.requests else
            f"{rounds} interleaved round(s), each measurement {box_s:g} s."))
    chat_items = [ChatCall(i, f"overhead request {i} " + "lorem ipsum dolor sit amet " * 3, 16)
                  for i in range(min(MAX_ITEMS, ctx.scale.requests or MAX_ITEMS))]
    embed_items = embedding_batches(min(2000, ctx.scale.requests or 2000), EMBED_BATCH, ctx.seed)
    plans = [ServerPlan("chat-zero", speed=ZERO_DELAY),
             ServerPlan("embed-zero", kind="embedding", speed=ZERO_DELAY)]
    # results[op][concurrency][contender] -> per round (samples, requests per second)
    results: dict[str, dict[int, dict[str, list[tuple[list[Sample], float]]]]] = {
        op: {c: {} for c in CONCURRENCY} for op in OPS}
    available = []
    for name in names:
        try:
            build(name)
            available.append(name)
        except Unavailable as exc:
            ctx.skip(name, str(exc))
    async with ctx.fleet(plans) as fleet:
        chat_target = Target("chat-zero", "chat", (fleet.servers[0].address,), ctx.tuning)
        embed_target = Target("embed-zero", "embedding", (fleet.servers[1].address,), ctx.tuning)
        for r in range(rounds):
            order = available[r % len(available):] + available[:r % len(available)]
            order = list(order)
            ctx.progress.line(f"overhead round {r + 1}/{rounds}: {', '.join(order)}")
            for name in order:
                # Opened for its own measurements only, so no contender's background work
                # (probes, LiteLLM's bookkeeping) runs while another is measured.
                chat, embed = build(name), build(name)
                try:
                    await chat.open(chat_target)
                    await embed.open(embed_target)
                    await warm_up(chat, chat_items[:64])
                    await _measure(embed, "embed", embed_items[:2], 2, None)
                    for op in OPS:
                        for c in CONCURRENCY:
                            got = await _measure(embed if op == "embed" else chat, op,
                                                 embed_items if op == "embed" else chat_items, c,
                                                 None if ctx.scale.requests else box_s)
                            results[op][c].setdefault(name, []).append(got)
                except Exception as exc:  # noted in the report; the others still run
                    ctx.failed(f"overhead {name}", exc)
                    available.remove(name)
                    for op in OPS:
                        for c in CONCURRENCY:
                            results[op][c].pop(name, None)
                finally:
                    await chat.close()
                    await embed.close()
    _tabulate(outcome, results)
    return outcome


async def _measure(contender: Contender, op: str, items: Sequence[Any], concurrency: int,
                   box_s: float | None) -> tuple[list[Sample], float]:
    """Samples and the steady request rate of one time-boxed closed loop (with no box: all of
    `items`). The box stretches, up to 2x, until 4 x concurrency requests have finished, so a
    slow contender still yields a rate rather than an empty box."""
    async def send(item: Any, t0: float) -> Sample:
        return await timed(op, contender, item, t0, encoding="base64")

    samples, wall = await closed_loop(send, items, concurrency, deadline_s=box_s,
                                   min_done=max(20, 4 * concurrency),
                                   max_s=None if box_s is None else 2 * box_s)
    return samples, steady_rate(samples, concurrency, wall)


def _metric(samples: Sequence[Sample], op: str) -> list[float]:
    """What 'latency' means for an op: time to first token for streams, else the whole call."""
    if op == "stream":
        return [s.ttft_s for s in samples if s.ok and s.ttft_s is not None]
    return [s.latency_s for s in samples if s.ok]


def _tabulate(outcome: Outcome, results: dict) -> None:
    table = Table("overhead against raw aiohttp (zero-delay server)",
                  ["op", "concurrency", "contender", "p50 ms", "p99 ms", "added p50 µs",
                   "added p99 µs", "requests/s", "throughput vs raw", "errors"])
    data: dict[str, Any] = {}
    for op in OPS:
        for c in CONCURRENCY:
            runs = results[op][c]
            raw_runs = runs.get(RAW, [])
            raw_values = [v for samples, _ in raw_runs for v in _metric(samples, op)]
            raw_p50, raw_p99 = percentile(raw_values, 50), percentile(raw_values, 99)
            for name, per_round in runs.items():
                values = [v for samples, _ in per_round for v in _metric(samples, op)]
                p50, p99 = percentile(values, 50), percentile(values, 99)
                rates = [rate for _, rate in per_round]
                fractions = [rate / raw_rate for rate, (_, raw_rate) in
                             zip(rates, raw_runs, strict=False) if raw_rate]
                errors = sum(1 for samples, _ in per_round for s in samples if not s.ok)
                fraction = median(fractions) if fractions else math.nan
                rate = median(rates)
                label = "ttft " if op == "stream" else ""
                table.rows.append([
                    op + (f" x{EMBED_BATCH}" if op == "embed" else ""), str(c), name,
                    label + ms(p50), label + ms(p99),
                    "—" if name == RAW else us(p50 - raw_p50),
                    "—" if name == RAW else us(p99 - raw_p99),
                    f"{rate:.0f}", "—" if name == RAW else pct(fraction), str(errors)])
                data.setdefault(op, {}).setdefault(f"c{c}", {})[name] = {
                    "n": len(values), "p50_s": p50, "p99_s": p99,
                    "added_p50_s": p50 - raw_p50, "added_p99_s": p99 - raw_p99,
                    "requests_per_s": rate, "throughput_vs_raw": fraction, "errors": errors}
                if c == 1:
                    outcome.cdfs.setdefault(f"overhead-{op}-c1", {})[name] = values
    table.notes.append("Latency columns for `stream` are the time to the first text piece. "
                       "Targets: modelfleet >= 90% of raw throughput at concurrency 64, < 200 µs "
                       "added at p50, < 1 ms added to time to first token.")
    outcome.tables.append(table)
    outcome.data = data

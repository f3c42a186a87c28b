"""A server slows 10x mid-run, then recovers: how fast does traffic leave, and come back?

Open loop (Poisson arrivals at a set rate), so the load stays on while the server is slow, as
independent users keep coming. A third of the way in, one of four equal servers gets
`{"slowdown": 10}`; two thirds in, `{"reset": true}`. Read from each contender's own record of
which server answered which request (in the order they were sent):

- requests until away: sent after the fault began before the faulty server's share of every
  window of WINDOW requests stayed below half its fair share until the heal ("stayed": a
  policy that ignores latency dips under the line now and then by chance, and must not be
  credited with leaving);
- requests until back: sent after the heal before the first window in which that share is at
  least half its fair share again;
- p99 of the requests sent during the fault.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bench.contenders import Target
from bench.contenders.base import timed
from bench.fleet import ServerPlan
from bench.measure import Sample, percentile, ratio, share
from bench.scenarios.base import (
    Context,
    Outcome,
    Table,
    Traffic,
    latency_summary,
    ms,
    pct,
    times,
    with_contender,
)
from bench.workload import ChatCall, chat_calls, open_loop

SPEED = 2.0
RATE_PER_S = 50.0  # about 12 requests in flight on four healthy servers
SLOWDOWN = 10.0
WINDOW = 20
MODEL = "chat-degrade"


def _window_shares(samples: Sequence[Sample], server: str, after_s: float, before_s: float,
                   window: int) -> list[float]:
    """`server`'s share of each run of `window` consecutive requests sent in [after_s, before_s)."""
    ordered = sorted((s for s in samples if after_s <= s.start_s < before_s and s.server),
                     key=lambda s: s.start_s)
    hits = [1 if s.server == server else 0 for s in ordered]
    return [sum(hits[i - window:i]) / window for i in range(window, len(hits) + 1)]


def requests_until_away(samples: Sequence[Sample], server: str, after_s: float, before_s: float,
                        *, threshold: float, window: int = WINDOW) -> float:
    """Requests sent after `after_s` before `server`'s windowed share went below `threshold`
    for good (until `before_s`); NaN if it was still above in the last window."""
    shares = _window_shares(samples, server, after_s, before_s, window)
    if not shares or shares[-1] >= threshold:
        return math.nan
    last_above = max((i for i, v in enumerate(shares) if v >= threshold), default=-1)
    return float(last_above + 1)


def requests_until_back(samples: Sequence[Sample], server: str, after_s: float, *,
                        threshold: float, window: int = WINDOW) -> float:
    """Requests sent after `after_s` before the first window in which `server`'s share reached
    `threshold` again; NaN if none did."""
    shares = _window_shares(samples, server, after_s, math.inf, window)
    return float(next((i for i, v in enumerate(shares) if v >= threshold), math.nan))


async def run(ctx: Context) -> Outcome:
    duration = ctx.scale.seconds(full=9.0, quick=3.6)
    fault_at, reset_at = duration / 3, 2 * duration / 3
    names = [n for n in ctx.contenders if n != "raw-aiohttp"]
    outcome = Outcome(
        "degrade",
        f"Four equal chat sims (`--speed {SPEED:g}`), open loop at {RATE_PER_S:g} requests/s for "
        f"{duration:g} s; at {fault_at:.1f} s one server gets `{{\"slowdown\": {SLOWDOWN:g}}}`, at "
        f"{reset_at:.1f} s it is reset. \"Until away\": requests sent after the fault before that "
        f"server's share of every window of {WINDOW} requests stayed under half its fair share "
        f"until the heal; \"until back\": requests sent after the heal before the first window "
        f"in which it got at least half its fair share again.")
    n = ctx.scale.n(full=int(duration * RATE_PER_S), quick=int(duration * RATE_PER_S))
    calls = chat_calls(n, ctx.seed, rate_per_s=n / duration)
    results: dict[str, list[Sample]] = {}
    async with ctx.fleet([ServerPlan(MODEL, speed=SPEED) for _ in range(4)]) as fleet:
        servers = tuple(s.address for s in fleet.servers)
        faulty = fleet.servers[0]
        target = Target(MODEL, "chat", servers, ctx.tuning, fleet)
        warmup = chat_calls(8, ctx.seed + 1, output_tokens=(2, 8))
        drain = ctx.tuning.request_timeout_s * 1.5

        for name in names:
            async def body(contender):
                async def send(call: ChatCall, t0: float) -> Sample:
                    return await timed("chat", contender, call, t0)

                async def slow() -> None:
                    await fleet.fault(faulty, slowdown=SLOWDOWN)

                async def heal() -> None:
                    await fleet.fault(faulty, reset=True)

                samples, _ = await open_loop(send, calls, drain_s=drain,
                                             timeline=[(fault_at, slow), (reset_at, heal)])
                return samples

            samples = await with_contender(ctx, name, target, body, warmup=warmup)
            await fleet.reset()
            if samples is not None:
                results[name] = samples

    fair = 1 / len(servers)
    table = Table("degrade: one of four servers 10x slower, then healed",
                  ["contender", "share before fault", "until away (requests)",
                   "until back (requests)", "share after heal",
                   "p99 during fault ms", "p99 overall ms", "errors", "fault p99 / oracle"])
    oracle_fault = math.nan
    rows = {}
    for name, samples in results.items():
        during = [s.latency_s for s in samples if s.ok and fault_at <= s.start_s < reset_at]
        away = requests_until_away(samples, faulty.address, fault_at, reset_at,
                                   threshold=fair / 2)
        back = requests_until_back(samples, faulty.address, reset_at, threshold=fair / 2)
        before = [s for s in samples if s.start_s < fault_at]
        healed = [s for s in samples if s.start_s >= reset_at]
        rows[name] = {"share_before": share(before, faulty.address),
                      "share_after": share(healed, faulty.address),
                      "until_away": away, "until_back": back,
                      "p99_fault_s": percentile(during, 99), **latency_summary(samples)}
        if name == "oracle":
            oracle_fault = rows[name]["p99_fault_s"]
    for name, r in rows.items():
        back = "n/a (never left)" if math.isnan(r["until_away"]) else _count(r["until_back"])
        table.rows.append([name, pct(r["share_before"]), _count(r["until_away"]), back,
                           pct(r["share_after"]),
                           ms(r["p99_fault_s"]), ms(r["p99_s"]), str(r["errors"]),
                           times(ratio(r["p99_fault_s"], oracle_fault))])
        r["p99_fault_vs_oracle"] = ratio(r["p99_fault_s"], oracle_fault)
    table.notes.append(f"{n} requests per contender at {n / duration:.0f}/s; fair share "
                       f"{fair:.0%}; \"never\": the share did not cross the line before the "
                       f"phase ended; shares are of the requests sent before the fault and after "
                       f"the heal.")
    outcome.tables.append(table)
    outcome.data = rows
    outcome.cdfs["degrade"] = {name: [s.latency_s for s in samples if s.ok]
                               for name, samples in results.items()}
    outcome.traffic["degrade"] = Traffic(
        list(servers), faulty.address, windows=[(fault_at, reset_at, f"{SLOWDOWN:g}x slower")],
        by_contender={name: [(s.start_s, s.server) for s in samples if s.ok and s.server]
                      for name, samples in results.items()})
    return outcome


def _count(value: float) -> str:
    return "never" if math.isnan(value) else f"{value:.0f}"

"""What a scenario gets (Context) and gives back (Outcome), and running one contender safely.

Every scenario follows one pattern: start a fleet, then for each contender build it, point it
at the fleet, warm it up, send the same seeded workload, close it, reset the fleet. The helper
here owns the parts that must never go wrong (closing the contender whatever happens, skipping
one whose optional package is missing, saying what it does), so scenarios hold only what is
specific to them.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.contenders import Contender, Target, Tuning, Unavailable, build
from bench.fleet import ServerPlan, SimFleet
from bench.measure import Sample, counts_by_server, percentile
from bench.progress import Progress
from bench.workload import ChatCall, closed_loop


@dataclass(frozen=True)
class Scale:
    """How big the runs are: full, --quick, or a fixed request count (the smoke test)."""

    quick: bool = False
    requests: int | None = None
    duration: float | None = None  # --duration: seconds per run of a time-boxed scenario

    def n(self, full: int, quick: int) -> int:
        if self.requests is not None:
            return self.requests
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        if self.requests is not None:  # a fixed count means "as short as possible"
            return min(quick, 2.0)
        return quick if self.quick else full

    def box(self, full: float, quick: float) -> float | None:
        """A time-boxed run's length: --duration, else full or quick; None with --requests
        (then the run ends after exactly that many requests)."""
        if self.duration is not None:
            return self.duration
        if self.requests is not None:
            return None
        return quick if self.quick else full


@dataclass
class Context:
    out_dir: Path
    contenders: list[str]
    scale: Scale
    seed: int
    progress: Progress
    tuning: Tuning = Tuning()
    loops: tuple[str, ...] = ("asyncio",)  # event loops of the cpu scenario's client processes
    prefix_contenders: list[str] = field(default_factory=list)  # the prefix scenario's line-up
    notes: list[str] = field(default_factory=list)  # skipped contenders and why

    def fleet(self, plans: Sequence[ServerPlan], *, hosts: Sequence[str] | None = None) -> SimFleet:
        """The sims for one scenario, logging under the output folder, announced as they come
        (with `hosts`: one loopback address each, all on one port)."""
        return SimFleet(plans, self.out_dir / "logs", say=self.progress.line, hosts=hosts)

    def failed(self, what: str, exc: BaseException) -> None:
        """A contender crashed: say so in the report, keep the traceback in logs/errors.log."""
        log = self.out_dir / "logs" / "errors.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"--- {what}\n{''.join(traceback.format_exception(exc))}\n")
        self.skip(what, f"failed: {type(exc).__name__}: {str(exc)[:200]}; traceback in {log}")

    def skip(self, name: str, why: str) -> None:
        note = f"{name}: skipped ({why})"
        if note not in self.notes:
            self.notes.append(note)
        self.progress.line(f"  {note}")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Traffic:
    """Who answered when, for the traffic-share-over-time plot."""

    servers: list[str]
    highlight: str  # the server whose share the plot draws (the slow or faulty one)
    windows: list[tuple[float, float, str]] = field(default_factory=list)  # shaded fault periods
    by_contender: dict[str, list[tuple[float, str]]] = field(default_factory=dict)


@dataclass
class Bars:
    """Stacked shares per contender (each server's part of the traffic), with a label each."""

    title: str
    by_contender: dict[str, list[float]] = field(default_factory=dict)  # fractions, stacked
    labels: dict[str, str] = field(default_factory=dict)  # written at the bar's right end


@dataclass
class Outcome:
    scenario: str
    setup: str  # one paragraph: the fleet, the load, the fault
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable results (JSON)
    cdfs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # plot -> contender -> s
    traffic: dict[str, Traffic] = field(default_factory=dict)
    bars: dict[str, Bars] = field(default_factory=dict)  # plot name -> stacked shares
    notes: list[str] = field(default_factory=list)


# ---- formatting -------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "—" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.1f}"


def us(seconds: float) -> str:
    return "—" if seconds is None or math.isnan(seconds) else f"{seconds * 1e6:+.0f}"


def pct(fraction: float) -> str:
    return "—" if fraction is None or math.isnan(fraction) else f"{fraction * 100:.1f}%"


def times(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}x"


def latency_summary(samples: Sequence[Sample]) -> dict[str, float]:
    good = [s.latency_s for s in samples if s.ok]
    return {"n": len(samples), "ok": len(good), "errors": len(samples) - len(good),
            "p50_s": percentile(good, 50), "p90_s": percentile(good, 90),
            "p99_s": percentile(good, 99), "p999_s": percentile(good, 99.9),
            "max_s": max(good) if good else math.nan,
            "by_server": counts_by_server(samples)}


# ---- running one contender --------------------------------------------------------------------


RunBody = Callable[[Contender], Awaitable[Any]]


async def with_contender(ctx: Context, name: str, target: Target, body: RunBody,
                         *, label: str = "", warmup: Sequence[ChatCall] = ()) -> Any | None:
    """Build, open, warm up, run `body`, and always close; None when the contender is skipped."""
    try:
        contender = build(name)
    except Unavailable as exc:
        ctx.skip(name, str(exc))
        return None
    ctx.progress.line(f"  {label}{name}: running")
    started = time.monotonic()
    try:
        await contender.open(target)
        if warmup:
            await warm_up(contender, warmup)
        result = await body(contender)
    except Exception as exc:  # one broken contender must not cost the whole run its results
        ctx.failed(f"{label}{name}", exc)
        return None
    finally:
        await contender.close()
    ctx.progress.line(f"  {label}{name}: done in {time.monotonic() - started:.1f}s")
    return result


async def warm_up(contender: Contender, calls: Sequence[ChatCall]) -> None:
    """A few unrecorded requests, the same for everyone: pools filled, first benchmarks done."""
    from bench.contenders.base import timed

    async def send(call: ChatCall, t0: float) -> Sample:
        return await timed("chat", contender, call, t0)

    await closed_loop(send, calls, concurrency=4)

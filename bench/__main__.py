"""`python -m bench`: run the scenarios against the contenders, print the tables, write reports.

    python -m bench                          # everything (about 10-15 minutes on 2 cores)
    python -m bench --quick                  # a smaller version of everything (under 3 minutes)
    python -m bench --scenario overhead --contenders raw,modelfleet:peak_ewma
    python -m bench --scenario cpu --loop asyncio,uvloop
    python -m bench --scenario prefix --duration 5    # prefix-aware routing, 5 s per run
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from bench import fleet, report
from bench.contenders import EVERY, FAMILIES, PREFIX, PREFIX_ONLY, Tuning, expand
from bench.cpu_client import LOOPS
from bench.progress import Progress
from bench.scenarios import NAMES, runner
from bench.scenarios.base import Context, Outcome, Scale

# --quick runs one of each kind of contender unless --contenders says otherwise: the point of
# a quick run is "does every part still work", and the full set takes the full run's time.
QUICK_CONTENDERS = ("raw-aiohttp,oracle,modelfleet:peak_ewma,modelfleet:round_robin,"
                    "litellm:latency-based-routing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark modelfleet's routing and overhead against raw aiohttp, an oracle "
                    "and LiteLLM's Router, on simulated fleets it starts itself on 127.0.0.1.")
    p.add_argument("--quick", action="store_true",
                   help="fewer requests and contenders (under 3 minutes on 2 cores)")
    p.add_argument("--scenario", action="extend", nargs="+", choices=NAMES, metavar="NAME",
                   help=f"run only these scenarios: {', '.join(NAMES)}")
    p.add_argument("--contenders", metavar="NAME,...",
                   help=f"contenders or families, comma-separated: {', '.join(FAMILIES)}, or any "
                        f"of {', '.join(EVERY)} (default: all; with --quick: {QUICK_CONTENDERS}, "
                        f"and the prefix scenario's own line-up)")
    p.add_argument("--requests", type=int, metavar="N",
                   help="send exactly N requests per contender and run (tiny runs for tests)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="seconds each contender runs in the time-boxed scenarios (prefix; "
                        "default 15, with --quick 4)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="where results.md, results.json, the plots and the sims' logs go "
                        "(default bench/results)")
    p.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    p.add_argument("--loop", default="asyncio", metavar="NAME,...",
                   help=f"event loops the cpu scenario's client processes run on, "
                        f"comma-separated: {', '.join(LOOPS)} (default asyncio; uvloop only "
                        f"if installed, else skipped with a note)")
    args = p.parse_args(argv)
    try:
        args.contender_names = expand(args.contenders or (QUICK_CONTENDERS if args.quick else "all"))
    except ValueError as exc:
        p.error(str(exc))
    if not args.contender_names:
        p.error("--contenders named no contender")
    # The prefix scenario's own contenders run there only; it runs its whole line-up unless
    # --contenders says otherwise (--quick shortens its runs instead).
    args.prefix_contenders = [n for n in PREFIX if n in expand(args.contenders or "all")]
    args.contender_names = [n for n in args.contender_names if n not in PREFIX_ONLY]
    if args.duration is not None and not args.duration > 0:
        p.error(f"--duration must be > 0 seconds, got {args.duration:g}")
    args.loops = tuple(dict.fromkeys(n.strip() for n in args.loop.split(",") if n.strip()))
    if not args.loops or any(n not in LOOPS for n in args.loops):
        p.error(f"--loop: use {' and/or '.join(LOOPS)}, comma-separated; got {args.loop!r}")
    if args.requests is not None and args.requests < 1:
        p.error(f"--requests must be >= 1, got {args.requests}")
    return args


async def run_all(args: argparse.Namespace, progress: Progress) -> tuple[list[Outcome], Context]:
    ctx = Context(out_dir=args.out, contenders=args.contender_names,
                  scale=Scale(quick=args.quick, requests=args.requests, duration=args.duration),
                  seed=args.seed, progress=progress, tuning=Tuning(), loops=args.loops,
                  prefix_contenders=args.prefix_contenders)
    # SIGTERM cancels the run like Ctrl-C does, so every fleet's `async with` stops its sims.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    outcomes = []
    for name in args.scenario or NAMES:
        progress.line(f"scenario {name}")
        outcomes.append(await runner(name)(ctx))
    return outcomes, ctx


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    progress = Progress()
    meta = {"command": " ".join(["python -m bench", *argv]), "started": report.stamp(),
            "machine": report.machine()}
    progress.line(f"contenders: {', '.join(args.contender_names)}")
    started = time.monotonic()
    try:
        outcomes, ctx = asyncio.run(run_all(args, progress))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every sim this run started has been stopped", file=sys.stderr)
        return 130
    meta["duration_s"] = time.monotonic() - started
    meta["loadavg_end"] = report.machine()["loadavg_1_5_15"]
    meta["notes"] = list(ctx.notes)
    meta["contenders"] = args.contender_names
    meta["prefix_contenders"] = args.prefix_contenders
    meta["sim_servers"] = fleet.started_addresses()
    paths = report.write(outcomes, meta, args.out, plots=not args.no_plots)
    print(report.markdown(outcomes, meta))
    progress.line("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

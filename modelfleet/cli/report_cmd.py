"""`modelfleet report`: probe every server now and print how each is doing.

Exit status is the fleet's health, so the command doubles as a cron check or a
readiness probe: 0 when every model has a server that answered, 1 when some
model has none, 2 for a bad flag or fleet file.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from modelfleet.cli import seconds_between

if TYPE_CHECKING:
    from modelfleet.config import FleetConfig

DEFAULT_WATCH_S = 2.0
DEFAULT_TIMEOUT_S = 5.0
_SECONDS = seconds_between(0, 3600, low_included=False)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report", parents=[common],
        help="probe every server now: status, latency, speed, queue, and where traffic would go",
        description="Probe every server of every model at once (the client's own tiny benchmark "
                    "request and a /metrics scrape) and print one table. Exit 0 when every model "
                    "has a server that answered, 1 when some model has none.",
    )
    p.add_argument("--model", metavar="M", action="append",
                   help="only this model (name or alias; repeat for more)")
    p.add_argument("--json", action="store_true",
                   help="print JSON for scripts: {\"servers\": [...], \"models\": {...}, \"ok\": ...}")
    p.add_argument("--watch", metavar="SECONDS", nargs="?", type=_SECONDS, const=DEFAULT_WATCH_S,
                   help=f"probe again every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C; "
                        "with --json, one JSON object per line")
    p.add_argument("--timeout", metavar="S", type=_SECONDS, default=None,
                   help=f"seconds one probe may take before its server counts as down "
                        f"(default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from modelfleet.config import load_config
    from modelfleet.errors import UnknownModel, UsageError

    config = load_config(args.config)
    models = None
    if args.model:
        try:
            models = list(dict.fromkeys(config.resolve_model(m).name for m in args.model))
        except UnknownModel as exc:
            raise UsageError(f"--model: {exc}") from None
    timeout_s = args.timeout or DEFAULT_TIMEOUT_S
    try:
        return asyncio.run(_report(config, models, timeout_s, args.json, args.watch))
    except KeyboardInterrupt:
        # Ctrl-C is how --watch ends, so not an error there; a single round cut short
        # checked nothing, so it must not pass for a healthy fleet.
        if not args.json:
            print(file=sys.stdout)
        return 0 if args.watch is not None else 130


async def _report(config: FleetConfig, models: list[str] | None, timeout_s: float,
                  as_json: bool, watch_s: float | None) -> int:
    import asyncio
    import time

    from modelfleet.cli.report_view import format_table, print_json
    from modelfleet.cli.terminal import use_colour
    from modelfleet.report import FleetProber

    out = sys.stdout
    tty = out.isatty()
    colour = use_colour(out)
    async with FleetProber(config, models=models, timeout_s=timeout_s) as prober:
        while True:
            started = time.monotonic()
            report = await prober.probe()
            if as_json:
                print_json(report, out)
            else:
                text = format_table(report, colour=colour)
                if watch_s is not None:
                    stamp = time.strftime("%H:%M:%S")
                    text = f"{stamp}  every {watch_s:g} s, Ctrl-C to stop\n\n{text}"
                    if tty:  # redraw in place: cursor home, clear the screen below
                        text = "\x1b[H\x1b[J" + text
                out.write(text + "\n")
                if watch_s is not None and not tty:
                    out.write("\n")
                out.flush()
            if watch_s is None:
                return 0 if report.ok else 1
            await asyncio.sleep(max(0.0, watch_s - (time.monotonic() - started)))

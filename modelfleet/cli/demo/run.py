"""The demo from start to end: prepare the fleet, launch it, drive the traffic, show the
phases and the report, stop everything, and say whether all went well."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from modelfleet.cli.demo import DEFAULT_DURATION_S
from modelfleet.cli.demo.fleet import (
    READY_TIMEOUT_S,
    LaunchedFleet,
    default_config_path,
    prepare_fleet,
)
from modelfleet.cli.demo.record import Record
from modelfleet.cli.demo.traffic import SLOWDOWN, drive
from modelfleet.cli.demo.view import LiveView, phase_table
from modelfleet.errors import FleetError


def run_demo(config: str | None = None, duration_s: float = DEFAULT_DURATION_S,
             out: TextIO = sys.stdout) -> int:
    """The whole demo; returns the exit code (0: every request answered, nothing left over)."""
    from modelfleet.cli.report_view import format_table
    from modelfleet.cli.terminal import use_colour
    from modelfleet.report import probe_fleet

    path = default_config_path(config)
    tty = out.isatty()
    colour = use_colour(out)
    workdir = Path(tempfile.mkdtemp(prefix="modelfleet-demo-"))
    keep_workdir = False
    restore_term = _sigterm_as_interrupt()
    record = Record()
    launched: LaunchedFleet | None = None
    interrupted = False
    stopped: tuple[int, list[int]] = (0, [])
    started = time.monotonic()
    try:
        fleet = prepare_fleet(path, workdir, out)
        count = sum(len(m.servers) for m in fleet.config.models.values())
        out.write(f"starting {count} simulated servers from {fleet.path} with the launcher "
                  f"(modelfleet serve) ...\n")
        out.flush()
        launched = LaunchedFleet(fleet, workdir)
        pids = launched.wait_ready(READY_TIMEOUT_S)
        out.write(f"all {len(pids)} servers up in {time.monotonic() - started:.1f} s; sending "
                  f"traffic for {duration_s:g} s through AsyncModelServer "
                  f"(policy {fleet.config.routing.policy})\n")
        if fleet.slow and fleet.kill:
            out.write(f"at {duration_s / 3:.0f} s {fleet.slow.address} becomes {SLOWDOWN:g}x "
                      f"slower; at {duration_s / 2:.0f} s {fleet.kill.address} is killed\n")
        out.write("\n")
        out.flush()
        view = LiveView(out, tty=tty, colour=colour, fleet=fleet)
        try:
            asyncio.run(drive(fleet, launched, duration_s, record, view))
        except KeyboardInterrupt:
            interrupted = True
        if not interrupted:
            out.write("\n" + phase_table(record, fleet, duration_s) + "\n\n")
            out.write("modelfleet report, right after the traffic stopped:\n")
            out.flush()
            try:
                report = asyncio.run(probe_fleet(fleet.config))
                out.write(format_table(report, colour=colour) + "\n\n")
            except KeyboardInterrupt:
                interrupted = True
    except KeyboardInterrupt:
        interrupted = True
    except FleetError:
        keep_workdir = launched is not None
        raise
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not
        try:                                                     # leave servers behind
            if launched is not None:
                stopped = launched.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
            restore_term()
            if keep_workdir:
                out.write(f"(the launcher's output and the server logs are in {workdir})\n")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(record, stopped, interrupted, duration_s, out)


def _verdict(record: Record, stopped: tuple[int, list[int]], interrupted: bool,
             duration_s: float, out: TextIO) -> int:
    total, failed = len(record.done), record.failed
    processes, left = stopped
    seconds = max((d.at for d in record.done), default=0.0) or duration_s
    gone = (f"stopped the launcher and the {processes - 1} processes under it, none left"
            if not left else f"{len(left)} processes were still running and were killed: "
            f"{', '.join(map(str, left))}")
    if interrupted:
        out.write(f"demo interrupted: {total} requests, {len(failed)} failed; {gone}\n")
        return 130
    for done in failed[:5]:
        out.write(f"failed at {done.at:.1f} s ({done.model}): {done.error}\n")
    out.write(f"demo: {total} requests, {len(failed)} failed, {total / seconds:.0f} req/s "
              f"for {seconds:.0f} s; {gone}\n")
    out.flush()
    return 0 if not failed and not left else 1


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SIGTERM ends the demo as Ctrl-C does, so its servers are stopped either way."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)

"""`modelfleet demo`: start the simulated fleet, send traffic, break two servers, watch
the traffic move, print the report, stop everything. The README's first command."""

from __future__ import annotations

import argparse

from modelfleet.cli import seconds_between
from modelfleet.cli.demo import DEFAULT_DURATION_S


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common],
        help="see the whole thing work on this machine: simulated fleet, traffic, failures",
        description="Start the simulated fleet of the fleet file with the launcher, send traffic "
                    "through AsyncModelServer, make one server 10x slower and kill another, show "
                    "where the traffic goes, print the report, and stop every process it started. "
                    "Needs no GPU; the servers are simulators.",
    )
    p.add_argument("--duration", metavar="S", type=seconds_between(3, 3600), default=DEFAULT_DURATION_S,
                   help=f"seconds of traffic (default {DEFAULT_DURATION_S:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modelfleet.cli.demo.run import run_demo

    return run_demo(args.config, args.duration)

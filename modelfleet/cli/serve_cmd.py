"""`modelfleet serve`: the launcher, the same command as `python serve_pipeline.py`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from modelfleet.launcher.cli import add_arguments

    p = sub.add_parser(
        "serve", parents=[common],
        help="start and supervise the servers of the fleet file that belong to this host",
        description="Start and supervise the model servers of the fleet file that belong to this host.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modelfleet.launcher.cli import execute

    return execute(args)

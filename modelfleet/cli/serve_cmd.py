"""`modelfleet serve` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve (not built yet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("not built yet")
    return 1

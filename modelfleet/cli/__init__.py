"""The `modelfleet` command: one console script, one module per subcommand.

Each subcommand module has `register(subparsers, common)` that adds its parser
and sets `func` to a function taking the parsed args and returning an exit
code. Heavy imports stay inside those functions so `modelfleet --help` is quick.
Usage and config mistakes exit 2 with a short message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from modelfleet.errors import ConfigError, FleetError, UsageError

SUBCOMMANDS = ("serve", "report", "config", "sim", "demo", "gateway")


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, before or after its positional arguments."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="fleet file (default: $MODELFLEET_CONFIG, else ./client_config.yaml)",
    )
    return common


def seconds_between(low: float, high: float, *, low_included: bool = True) -> Callable[[str], float]:
    """An argparse type for a number of seconds from low to high, so a flag's mistake is
    named by argparse ("--watch: must be ...") with exit 2, like every other usage error."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
        if not (low <= value if low_included else low < value) or not value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {low:g} and {high:g} seconds, got {text}")
        return value

    return seconds


def build_parser() -> argparse.ArgumentParser:
    from modelfleet.cli import config_cmd, demo_cmd, gateway_cmd, report_cmd, serve_cmd, sim_cmd

    common = common_options()
    parser = argparse.ArgumentParser(
        prog="modelfleet",
        description="Route requests across vLLM / SGLang fleets, launch their servers, report on them.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (serve_cmd, report_cmd, config_cmd, sim_cmd, demo_cmd, gateway_cmd):
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as exc:
        print(f"modelfleet: {exc}" if isinstance(exc, UsageError) else str(exc), file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"modelfleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_left()


def _reader_left() -> int:
    """`modelfleet ... | head`: the reader left, which is not an error worth a traceback.
    Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # what a shell reports for a writer killed by SIGPIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

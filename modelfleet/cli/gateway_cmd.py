"""`modelfleet gateway`: the fleet as one OpenAI endpoint (settings: the fleet file's
`gateway:` section; these flags override it)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any


def _number(kind: type, low: float, high: float | None = None) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}"
                                             f", got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low:g}..{high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "gateway", parents=[common],
        help="serve the fleet as one OpenAI-compatible endpoint",
        description="Serve the fleet as one OpenAI-compatible HTTP endpoint (chat, completions, "
                    "embeddings, models, health, metrics). Settings come from the fleet file's "
                    "`gateway:` section; these flags override them.")
    p.add_argument("--host", help="address to listen on (default: gateway.host, 127.0.0.1)")
    p.add_argument("--port", type=_number(int, 0, 65535),
                   help="port to listen on; 0: any free one (default: gateway.port, 8000)")
    p.add_argument("--workers", type=_number(int, 1, 256),
                   help="processes sharing the port (default: gateway.workers, 1)")
    p.add_argument("--max-concurrent", type=_number(int, 1),
                   help="requests at once per worker; more get 429 (default 1024)")
    p.add_argument("--max-body-bytes", type=_number(int, 1024),
                   help="largest request body; larger get 413 (default 16 MiB)")
    p.add_argument("--drain-s", type=_number(float, 0),
                   help="on SIGTERM, seconds in-flight requests may take to finish (default 30)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker
    p.set_defaults(func=run)


def settings(args: argparse.Namespace) -> Any:
    """The fleet file (checked) and its gateway section with the flags applied."""
    from modelfleet.config import find_config_path, load_config

    config = load_config(find_config_path(args.config))
    overrides: dict[str, Any] = {name: getattr(args, name) for name in
                                 ("host", "port", "workers", "max_concurrent", "max_body_bytes",
                                  "drain_s") if getattr(args, name) is not None}
    if args.no_access_log:
        overrides["access_log"] = False
    return config, replace(config.gateway, **overrides)


def run(args: argparse.Namespace) -> int:
    from modelfleet.gateway import load_keys, run_worker
    from modelfleet.gateway.server import setup_logging

    config, spec = settings(args)
    keys = load_keys(spec, config.path.parent if config.path else None)
    setup_logging(spec.access_log)
    if spec.workers == 1 or args.reuse_port:
        return run_worker(config, spec, keys, reuse_port=args.reuse_port)
    from modelfleet.gateway.workers import reserve_port, run_workers

    held = None
    port = spec.port
    if port == 0:
        held, port = reserve_port(spec.host)
    argv = [sys.executable, "-m", "modelfleet", "gateway", "-c", str(config.path),
            "--host", spec.host, "--port", str(port), "--workers", "1", "--reuse-port",
            "--max-concurrent", str(spec.max_concurrent), "--max-body-bytes",
            str(spec.max_body_bytes), "--drain-s", str(spec.drain_s)]
    if not spec.access_log:
        argv.append("--no-access-log")
    try:
        return run_workers(argv, spec.workers, spec.drain_s)
    finally:
        if held is not None:
            held.close()

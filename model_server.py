"""The client API of modelfleet: `from model_server import ModelServer, AsyncModelServer`.

Thin on purpose: everything lives in `modelfleet.client`. Run as a script,
`python model_server.py [-c FILE]` sends one small request to each model of the
fleet and prints what came back, from which server, and how fast: the quickest
way to see that a fleet answers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modelfleet.client import (
    AsyncModelServer,
    ChatResult,
    ChatStream,
    EmbedResult,
    ModelServer,
    ModelStatus,
    SyncChatStream,
)
from modelfleet.errors import (
    ConfigError,
    FleetError,
    NoServerAvailable,
    RequestRejected,
    StreamInterrupted,
    UnknownModel,
    UsageError,
)

__all__ = [
    "AsyncModelServer",
    "ChatResult",
    "ChatStream",
    "EmbedResult",
    "FleetError",
    "ModelServer",
    "ModelStatus",
    "NoServerAvailable",
    "RequestRejected",
    "StreamInterrupted",
    "SyncChatStream",
    "UnknownModel",
]

REPLY_WIDTH = 60


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="model_server.py",
        description="Send one request to every model of the fleet; print reply, server, latency.")
    parser.add_argument("-c", "--config", metavar="FILE", default=None,
                        help="fleet file (default: $MODELFLEET_CONFIG, else ./client_config.yaml)")
    args = parser.parse_args(argv)
    try:
        fleet = ModelServer(args.config)
    except (ConfigError, UsageError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    failed = 0
    print(f"{'model':<16} {'server':<22} {'latency':>10}  reply")
    with fleet:
        benchmark = fleet.config.benchmark
        for name, spec in fleet.config.models.items():
            try:
                if spec.kind == "embedding":
                    embedded = fleet.embed_result(name, [benchmark.embedding_input])
                    line = f"[{len(embedded.vectors[0])}-dim vector]"
                    server, latency_s = embedded.servers[0], embedded.latency_s
                else:
                    result = fleet.chat(name, [dict(m) for m in benchmark.messages],
                                        max_tokens=benchmark.max_tokens)
                    line, server, latency_s = _one_line(result.text), result.server, result.latency_s
            except FleetError as exc:
                failed += 1
                print(f"{name:<16} FAILED  {exc}")
                continue
            print(f"{name:<16} {server:<22} {latency_s * 1000:>7.1f} ms  {line}")
    return 1 if failed else 0


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= REPLY_WIDTH else flat[:REPLY_WIDTH - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())

"""`modelfleet sim`: run one simulated vLLM server (see modelfleet.sim).

The launcher starts these for `backend: sim` servers, and tests start them
directly, so every flag mirrors a `sim:` key of the fleet file.
"""

from __future__ import annotations

import argparse
import os

from modelfleet.config import SimSpec
from modelfleet.errors import FleetError, UsageError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sim", parents=[common],
        help="run one simulated vLLM server (no GPU, no model; for tests and demos)",
        description="Run a simulated OpenAI-compatible server that behaves like vLLM under load. "
                    "It is a simulator: replies are filler text, embeddings are hashes.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--model", required=True, help="the served model name clients must send")
    p.add_argument("--kind", choices=("chat", "embedding"), default="chat",
                   help="chat (chat + completions APIs) or embedding (default chat)")
    p.add_argument("--speed", type=float, default=SimSpec.speed,
                   help="divide every simulated time by this (default 1; >= 1e6: no delays)")
    p.add_argument("--batch-slowdown", type=float, default=SimSpec.batch_slowdown,
                   help="per-token slowdown per extra running request (default 0.02 = 2%%)")
    p.add_argument("--dim", type=int, default=SimSpec.dim, help="embedding dimensions (default 384)")
    p.add_argument("--max-batch", type=int, default=SimSpec.max_batch,
                   help="requests run at once; more wait in a queue (default 64)")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="context length: longer prompts get a 400 (default 4096)")
    p.add_argument("--kv-cache-tokens", type=int, default=SimSpec.kv_cache_tokens,
                   help="a KV cache of this many tokens, shared by running requests and cached "
                        "prompt prefixes (LRU), with prefix caching: a cached prefix skips its "
                        "prefill; requests wait while running ones fill it (default: none, no "
                        "prefix caching, usage against max-batch x max-model-len)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="with --kv-cache-tokens, cache no prefixes (on by default, as in vLLM)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="share prefill: one engine step computes at most this many tokens (prompt "
                        "chunks, and one per decoding request), and each prompt token lengthens "
                        "the step for everyone, as on a GPU (vLLM's default is 8192; default "
                        "here: unset, each prefill runs on its own)")
    p.add_argument("--seed", type=int, default=SimSpec.seed, help="seed of the generated text and faults")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SIM_API_KEY)")
    p.add_argument("--fork-worker", action="store_true",
                   help="start one child worker process, as vLLM's engine core")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be 1..65535, got {args.port}")
    if not args.speed > 0:
        raise UsageError(f"--speed must be > 0 (1 = real time, 10 = ten times faster), got {args.speed}")
    if not args.batch_slowdown >= 0:
        raise UsageError(f"--batch-slowdown must be >= 0, got {args.batch_slowdown}")
    for flag in ("dim", "max_batch", "max_model_len", "max_num_batched_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < args.max_model_len:
        raise UsageError(f"--kv-cache-tokens ({args.kv_cache_tokens}) must hold one request of "
                         f"--max-model-len ({args.max_model_len}) tokens, as vLLM requires: raise "
                         f"it or lower --max-model-len")
    if not args.model.strip():
        raise UsageError("--model must not be empty")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import asyncio

    from modelfleet.sim.server import SimSettings, serve

    settings = SimSettings(
        model=args.model, kind=args.kind, speed=args.speed, batch_slowdown=args.batch_slowdown,
        dim=args.dim, max_batch=args.max_batch, seed=args.seed, max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens, prefix_caching=args.prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        api_key=args.api_key or os.environ.get("SIM_API_KEY") or None,
    )
    try:
        asyncio.run(serve(settings, args.host, args.port, fork_worker=args.fork_worker))
    except OSError as exc:
        raise FleetError(str(exc)) from None
    return 0

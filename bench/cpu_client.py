"""`python -m bench.cpu_client`: one contender, alone in its process, and the CPU it spent.

The `cpu` scenario keeps one of these open per contender (and event loop). Its process holds nothing
but the contender and a closed loop, so the kernel's count of this process's CPU time (user +
system, every thread, from getrusage) around the measured requests is the client's cost and
nothing else's: neither the server's, nor the bench's, nor another helper's test run on the
same cores. Each mode is warmed up unrecorded first (connections opened, modelfleet's first
benchmark done), then measured. Prints one JSON object per measurement on stdout.

    python -m bench.cpu_client --contender raw-aiohttp --server 127.0.0.1:8000 --requests 5000

(the server: `python -m bench.canned_server --port 8000`). With `--serve` it measures slices
on command instead, which is how `python -m bench --scenario cpu` drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.contenders import ALL, Contender, Target, build
from bench.workload import ChatCall

MODES = ("chat", "stream")
CONCURRENCY = 32
LOOPS = ("asyncio", "uvloop")


def calls(n: int, offset: int = 0) -> list[ChatCall]:
    """The same short chat for everyone (16 words, max_tokens 16), numbered."""
    return [ChatCall(offset + i, f"cpu request {offset + i} " + "lorem ipsum dolor sit amet " * 3,
                     16) for i in range(n)]


async def drive(contender: Contender, mode: str, items: Sequence[ChatCall],
                concurrency: int = CONCURRENCY) -> tuple[int, str | None]:
    """`concurrency` callers work through `items`; returns (errors, the first error).

    Nothing else per request (no timestamps, no sample records), so the loop itself adds as
    little as it can to either side of the ratio.
    """
    send = contender.chat if mode == "chat" else contender.chat_stream
    pending = iter(items)
    errors = 0
    first_error: str | None = None

    async def caller() -> None:
        nonlocal errors, first_error
        for call in pending:
            try:
                await send(call)
            except Exception as exc:  # counted: a contender that fails is not cheap, it is broken
                errors += 1
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {str(exc)[:200]}"

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return errors, first_error


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def measure_once(contender: Contender, mode: str, requests: int) -> dict[str, Any]:
    """One measured slice: `requests` requests and the CPU this process spent on them."""
    items = calls(requests)
    gc.collect()  # every slice starts with the same clean heap
    user0, sys0 = _cpu()
    wall0 = time.perf_counter()
    errors, first_error = await drive(contender, mode, items, CONCURRENCY)
    wall = time.perf_counter() - wall0
    user1, sys1 = _cpu()
    return {"contender": contender.name, "mode": mode, "requests": requests, "errors": errors,
            "first_error": first_error, "user_s": user1 - user0, "sys_s": sys1 - sys0,
            "wall_s": wall}


async def one_shot(name: str, target: Target, modes: Sequence[str], requests: int,
                   warmup: int) -> list[dict[str, Any]]:
    """Each mode warmed up, then measured once."""
    contender = build(name)
    try:
        await contender.open(target)
        results = []
        for mode in modes:
            await drive(contender, mode, calls(warmup, offset=10**7), CONCURRENCY)
            results.append(await measure_once(contender, mode, requests))
        return results
    finally:
        await contender.close()


async def serve(name: str, target: Target, warmup: int) -> None:
    """Slices on command: one JSON object a line on stdin (`{"mode": "chat", "requests": N}`),
    one result a line on stdout, until stdin ends. The bench keeps one such process per
    contender open and alternates slices between them, so the two sides of a ratio are
    measured seconds apart, under the same neighbours."""
    contender = build(name)
    loop = asyncio.get_running_loop()
    warm: set[str] = set()
    try:
        await contender.open(target)
        print(json.dumps({"ready": name}), flush=True)
        while True:
            # A thread blocked on a pipe costs no CPU; only between slices is one waiting.
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            command = json.loads(line)
            mode = command["mode"]
            if mode not in warm:
                await drive(contender, mode, calls(warmup, offset=10**7), CONCURRENCY)
                warm.add(mode)
            print(json.dumps(await measure_once(contender, mode, int(command["requests"]))),
                  flush=True)
    finally:
        await contender.close()


def run_on(loop_name: str, main: Any) -> Any:
    """Run a coroutine on the stock loop or, when asked and installed, on uvloop."""
    if loop_name == "uvloop":
        import uvloop  # the caller checked it is installed

        return uvloop.run(main) if hasattr(uvloop, "run") else _uvloop_legacy(uvloop, main)
    return asyncio.run(main)


def _uvloop_legacy(uvloop: Any, main: Any) -> Any:
    uvloop.install()
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_client", description=__doc__)
    p.add_argument("--contender", required=True, choices=ALL)
    p.add_argument("--server", required=True, help="host:port of the server")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: chat, stream")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--serve", action="store_true",
                   help="measure slices on command from stdin (how the cpu scenario runs it)")
    p.add_argument("--loop", choices=LOOPS, default="asyncio")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"--modes: use chat and/or stream, got {args.modes!r}")
    if args.requests < 1 or args.warmup < 0:
        p.error("--requests must be >= 1, --warmup >= 0")
    target = Target(args.model, "chat", (args.server,))
    if args.serve:
        run_on(args.loop, serve(args.contender, target, args.warmup))
        return 0
    for result in run_on(args.loop, one_shot(args.contender, target, modes, args.requests,
                                             args.warmup)):
        print(json.dumps({**result, "loop": args.loop}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

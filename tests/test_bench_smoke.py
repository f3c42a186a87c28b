"""The bench still runs: tiny overhead, cpu and gateway runs as a user would start them,
tables and JSON out.

No timing is asserted (speed claims live in bench/README.md, measured side by side); this only
checks that the harness starts its sims, drives raw aiohttp and modelfleet through every op,
writes its reports and stops every sim it started. It needs nothing beyond the test extra:
no matplotlib (--no-plots), no LiteLLM (built-in contenders only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from helpers import ROOT

from modelfleet.config import RoutingSpec

CONTENDERS = "raw-aiohttp,modelfleet:peak_ewma"


def run_bench(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def refuses(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def test_quick_overhead_writes_table_and_json(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--quick", "--scenario", "overhead", "--no-plots", "--contenders",
                     CONTENDERS, "--requests", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The table on stdout, with a row per op, concurrency and contender.
    for op in ("chat", "stream", "embed x64"):
        for c in ("1", "64"):
            for name in CONTENDERS.split(","):
                assert f"| {op} | {c} | {name} |" in proc.stdout, (op, c, name, proc.stdout)
    assert "[00:" in proc.stderr  # progress lines while it ran

    doc = json.loads((out / "results.json").read_text())
    results = doc["scenarios"]["overhead"]["results"]
    for op in ("chat", "stream", "embed"):
        for c in ("c1", "c64"):
            for name in CONTENDERS.split(","):
                row = results[op][c][name]
                assert row["n"] == 12 and row["errors"] == 0, (op, c, name, row)
    assert doc["command"].startswith("python -m bench --quick --scenario overhead")
    assert (out / "results.md").read_text().count("| chat | 1 |") == 2
    assert not list(out.glob("*.png"))

    # Every sim the bench started is gone.
    assert doc["sim_servers"], doc
    assert all(refuses(a) for a in doc["sim_servers"]), doc["sim_servers"]


def test_cpu_scenario_measures_each_client_process(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--scenario", "cpu", "--no-plots", "--contenders", CONTENDERS,
                     "--requests", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("chat", "stream"):
        for name in CONTENDERS.split(","):
            assert f"| {mode} | asyncio | {name} | 12 |" in proc.stdout, (mode, name, proc.stdout)

    doc = json.loads((out / "results.json").read_text())
    results = doc["scenarios"]["cpu"]["results"]
    for mode in ("chat", "stream"):
        rows = results[mode]["asyncio"]
        for name in CONTENDERS.split(","):
            assert rows[name]["requests"] == 12, (mode, name, rows[name])
            assert rows[name]["cpu_us_per_request"] > 0, (mode, name, rows[name])
        assert rows["modelfleet:peak_ewma"]["cpu_vs_raw"] > 0, rows
    # The canned server is stopped, and so is every client process (the log says what ran).
    assert doc["sim_servers"] and all(refuses(a) for a in doc["sim_servers"]), doc["sim_servers"]
    assert "bench.cpu_client --serve --contender raw-aiohttp" in \
        (out / "logs" / "cpu-clients.log").read_text()


def test_gateway_scenario_measures_direct_and_one_and_two_workers(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--scenario", "gateway", "--no-plots", "--requests", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = ("direct", "gateway x1", "gateway x2")
    for op in ("chat", "stream"):
        for c in ("1", "64"):
            for path in paths:
                assert f"| {op} | {c} | {path} |" in proc.stdout, (op, c, path, proc.stdout)
    assert "**gateway targets**" in proc.stdout

    doc = json.loads((out / "results.json").read_text())
    results = doc["scenarios"]["gateway"]["results"]
    for op in ("chat", "stream"):
        for c in ("c1", "c64"):
            for path in paths:
                row = results[op][c][path]
                assert row["n"] == 12 and row["errors"] == 0, (op, c, path, row)
    # The sim and both gateways (a parent and its two workers for x2) are stopped.
    gateways = re.findall(r"starting gateway x\d on (\S+)", proc.stderr)
    assert len(gateways) == 2, proc.stderr
    assert all(refuses(a) for a in [*doc["sim_servers"], *gateways]), proc.stderr


def test_unknown_loop_is_a_usage_error(tmp_path):
    proc = run_bench("--scenario", "cpu", "--loop", "asyncio,trio", "--out", str(tmp_path),
                     timeout=60)
    assert proc.returncode == 2
    assert "--loop: use asyncio and/or uvloop" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_contender_is_a_usage_error(tmp_path):
    proc = run_bench("--contenders", "raw-aiohttp,nope", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "unknown contender 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_stops_every_sim(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--scenario", "degrade", "--contenders", "oracle",
         "--no-plots", "--out", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    addresses: list[str] = []
    seen = []
    try:
        for line in proc.stderr:  # pytest-timeout bounds this if the bench never gets there
            seen.append(line)
            if "sims up: " in line:
                addresses = re.findall(r"127\.0\.0\.1:\d+", line)
            if "oracle: running" in line:
                break
        assert addresses, "".join(seen)
        assert not any(refuses(a) for a in addresses)  # they were up mid-run
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 130
    assert all(refuses(a) for a in addresses), addresses


def test_prefix_scenario_tiny_run(tmp_path):
    """Both workloads, the oracle that mirrors the sims' caches, the hash baseline and the
    prefix-aware client (skipped, saying why, where this modelfleet lacks the routing key)."""
    out = tmp_path / "results"
    names = ["oracle", "prefix-hash", "modelfleet:peak_ewma+prefix",
             "modelfleet:peak_ewma+prefix/8-clients"]
    proc = run_bench("--scenario", "prefix", "--no-plots", "--contenders", ",".join(names),
                     "--requests", "16", "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefix_aware = any(f.name == "prefix_aware" for f in dataclasses.fields(RoutingSpec))
    ran = names if prefix_aware else names[:2]
    doc = json.loads((out / "results.json").read_text())
    results = doc["scenarios"]["prefix"]["results"]
    for variant in ("shared", "hot"):
        assert set(results[variant]) == set(ran), (variant, results[variant])
        for name in ran:
            row = results[variant][name]
            assert row["requests"] == 16 and row["errors"] == 0, (variant, name, row)
            assert row["query_tokens"] > 0 and 0 <= row["hit_ratio"] <= 1, (variant, name, row)
            assert sum(row["shares"]) == pytest.approx(1), (variant, name, row)
            assert f"| {name} | 16 |" in proc.stdout, (name, proc.stdout)
    assert "| hot prefix: TTFT p99 vs round_robin | hot |" in proc.stdout
    if not prefix_aware:
        assert any("modelfleet:peak_ewma+prefix: skipped" in n and "prefix_aware" in n
                   for n in doc["notes"]), doc["notes"]
    # Fresh sims for every run, and every one of them stopped.
    assert len(doc["sim_servers"]) == 4 * 2 * len(ran), doc["sim_servers"]
    assert all(refuses(a) for a in doc["sim_servers"]), doc["sim_servers"]


def test_tail_scenario_tiny_run(tmp_path):
    """Hedging off, auto and fixed, and the oracle, side by side on stalling sims; the
    servers' load is counted from their http_requests_total (no timing asserted)."""
    out = tmp_path / "results"
    proc = run_bench("--scenario", "tail", "--no-plots", "--requests", "24", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["scenarios"]["tail"]["results"]
    assert list(results) == ["hedging off", "hedge_after: auto", "hedge_after: 0.1", "oracle"]
    for name, row in results.items():
        assert row["n"] == 24 and row["errors"] == 0, (name, row)
        assert row["served"] >= 24 and row["load"] >= 1.0, (name, row)  # every one reached a sim
        assert f"| {name} |" in proc.stdout, (name, proc.stdout)
    assert results["hedging off"]["hedges"] == {}
    assert set(results["hedge_after: 0.1"]["hedges"]) >= {"sent", "won", "lost", "denied_by_budget"}
    doc = json.loads((out / "results.json").read_text())
    assert all(refuses(a) for a in doc["sim_servers"]), doc["sim_servers"]


def test_scale_out_scenario_tiny_run(tmp_path):
    """2 -> 3 -> 2 sims named by the bench's DNS server, under load: the newcomer is found
    and answers, the leaver gets nothing once the client dropped it, no caller error."""
    out = tmp_path / "results"
    proc = run_bench("--scenario", "scale-out", "--no-plots", "--requests", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    results = doc["scenarios"]["scale-out"]["results"]
    assert results["caller_errors"] == 0 and results["requests"] > 0, results
    (joined, row), = results["joined"].items()
    assert joined.startswith("127.0.0.4:") and row["first_answer_s"] >= 0, results
    (left, row), = results["left"].items()
    assert left == joined and row["requests_after_client_dropped"] == 0, results
    assert "| requests | caller errors |" in proc.stdout
    assert doc["sim_servers"] and all(refuses(a) for a in doc["sim_servers"]), doc["sim_servers"]

"""`modelfleet report` against real sims on 127.0.0.1: statuses, exit codes, output forms.

One small fleet is started for the module: a chat model with a live server, a
server made 10x slower through /sim/fault and a port nobody listens on, and an
embedding model behind an api key. Servers that hang are plain listening
sockets that never accept: the kernel completes the connection, nobody answers.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, free_port, http_json, run_cli, sim_argv, wait_http_ok, write_fleet

API_KEY = "sk-report-test-secret-7f3a"


class Fleet:
    def __init__(self, live: int, slow: int, dead: int, embed: int) -> None:
        self.live, self.slow, self.dead, self.embed = live, slow, dead, embed

    def addr(self, port: int) -> str:
        return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    ports = {name: free_port() for name in ("live", "slow", "dead", "embed")}
    procs = []
    try:
        for name, kind, extra in (("live", "chat", {}), ("slow", "chat", {}),
                                  ("embed", "embedding", {"api_key": API_KEY})):
            model = "emb" if kind == "embedding" else "chat"
            argv = sim_argv(ports[name], model, kind, speed=5, **extra)
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for name, proc in zip(("live", "slow", "embed"), procs, strict=True):
            wait_http_ok(f"http://127.0.0.1:{ports[name]}/health", proc=proc)
        status, body = http_json(f"http://127.0.0.1:{ports['slow']}/sim/fault", {"slowdown": 10})
        assert status == 200, body
        yield Fleet(**ports)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fleet_file(tmp_path: Path, fleet: Fleet, *, chat_ports: list[int] | None = None,
               name: str = "fleet.yaml") -> Path:
    chat = chat_ports if chat_ports is not None else [fleet.live, fleet.slow, fleet.dead]
    return write_fleet(tmp_path / name, {
        "chat": {"kind": "chat", "backend": "sim",
                 "servers": [{"host": "127.0.0.1", "port": p} for p in chat]},
        "emb": {"kind": "embedding", "backend": "sim", "api_key": API_KEY, "aliases": ["E"],
                "servers": [{"host": "127.0.0.1", "port": fleet.embed}]},
    })


def report_json(*args: str) -> tuple[int, dict]:
    result = run_cli("report", "--json", *args)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_json_lists_live_slowed_and_dead_servers_with_their_status(tmp_path: Path,
                                                                   fleet: Fleet) -> None:
    code, body = report_json("-c", str(fleet_file(tmp_path, fleet)))
    assert code == 0, body
    rows = {row["server"]: row for row in body["servers"]}
    assert list(rows) == [fleet.addr(p) for p in (fleet.live, fleet.slow, fleet.dead, fleet.embed)]

    live, slow, dead, embed = (rows[fleet.addr(p)] for p in
                               (fleet.live, fleet.slow, fleet.dead, fleet.embed))
    assert live["status"] == "up" and live["healthy"] and live["reason"] == ""
    assert live["latency_s"] > 0 and live["ttft_s"] > 0 and live["tokens_per_s"] > 0
    assert live["running"] == 0 and live["waiting"] == 0  # read from its /metrics

    assert slow["status"] == "degraded" and slow["healthy"]
    assert f"slower than {fleet.addr(fleet.live)}" in slow["reason"]
    assert slow["latency_s"] > 2 * live["latency_s"]

    assert dead["status"] == "down" and not dead["healthy"]
    assert dead["reason"].startswith("refused")
    assert dead["latency_s"] is None and dead["running"] is None

    assert embed["status"] == "up" and embed["ms_per_input"] > 0 and embed["ttft_s"] is None

    # The routing pool fed with these probes sends the next request to the live server.
    assert [r["server"] for r in body["servers"] if r["picked"]] == [fleet.addr(fleet.live),
                                                                     fleet.addr(fleet.embed)]
    assert body["models"]["chat"] == {"kind": "chat", "policy": "peak_ewma", "servers": 3,
                                      "healthy": 2, "picked": fleet.addr(fleet.live)}
    assert body["ok"] is True
    assert API_KEY not in json.dumps(body)


def test_exit_1_when_a_model_has_no_healthy_server(tmp_path: Path, fleet: Fleet) -> None:
    config = fleet_file(tmp_path, fleet, chat_ports=[fleet.dead, free_port()])
    code, body = report_json("-c", str(config))
    assert code == 1
    assert body["ok"] is False
    assert body["models"]["chat"]["healthy"] == 0 and body["models"]["chat"]["picked"] is None
    assert body["models"]["emb"]["healthy"] == 1
    assert {r["status"] for r in body["servers"] if r["model"] == "chat"} == {"down"}

    plain = run_cli("report", "-c", str(config))
    assert plain.returncode == 1
    assert "NOT OK: no healthy server for chat" in plain.stdout


def test_plain_table_when_piped(tmp_path: Path, fleet: Fleet) -> None:
    result = run_cli("report", "-c", str(fleet_file(tmp_path, fleet)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[" not in out  # no colour codes into a pipe
    lines = out.splitlines()
    header = lines[0]
    for column in ("MODEL", "SERVER", "STATUS", "PROBE", "TTFT", "SPEED", "RUN", "WAIT", "WHY"):
        assert column in header
    live_row = next(line for line in lines if fleet.addr(fleet.live) in line)
    slow_row = next(line for line in lines if fleet.addr(fleet.slow) in line)
    dead_row = next(line for line in lines if fleet.addr(fleet.dead) in line)
    assert live_row.startswith("chat") and "* " + fleet.addr(fleet.live) in live_row
    assert " up " in live_row and "tok/s" in live_row
    assert " degraded " in slow_row and "slower than" in slow_row
    assert " down " in dead_row and "refused" in dead_row
    # Aligned: every row's STATUS starts in the header's STATUS column.
    column = header.index("STATUS")
    for row in (live_row, slow_row, dead_row):
        assert row[column:].split()[0] in ("up", "degraded", "down"), row
    assert "ms/input" in next(line for line in lines if fleet.addr(fleet.embed) in line)
    assert "ok: every model has a healthy server" in out
    assert API_KEY not in out + result.stderr


def test_model_filter_by_name_or_alias(tmp_path: Path, fleet: Fleet) -> None:
    config = str(fleet_file(tmp_path, fleet))
    code, body = report_json("-c", config, "--model", "E")
    assert code == 0
    assert [r["server"] for r in body["servers"]] == [fleet.addr(fleet.embed)]
    assert list(body["models"]) == ["emb"]

    # Only the chosen model counts for the exit code: the chat model alone is healthy too.
    code, body = report_json("--model", "chat", "-c", config)
    assert code == 0 and {r["model"] for r in body["servers"]} == {"chat"}


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The `modelfleet` entry point in this process (flag checks need no server)."""
    from modelfleet.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--watch", "zero"], "--watch: must be a number of seconds"),
    (["--timeout", "-1"], "--timeout"),
    (["--model", "nope"], "unknown model 'nope'; known models: chat, emb"),
])
def test_usage_errors_exit_2(tmp_path: Path, fleet: Fleet, capsys: pytest.CaptureFixture[str],
                             args: list[str], message: str) -> None:
    code, _, err = cli(["report", "-c", str(fleet_file(tmp_path, fleet)), *args], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_fleet_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["report", "-c", str(tmp_path / "absent.yaml")], capsys)
    assert code == 2
    assert "absent.yaml" in err and "does not exist" in err


def test_hung_servers_cost_one_timeout_not_one_each(tmp_path: Path) -> None:
    """Ten servers that accept connections and never answer: probed at once, each given
    up after the timeout, so the round takes about one timeout (sequential: ten)."""
    sockets = []
    try:
        for _ in range(10):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            sockets.append(s)
        config = write_fleet(tmp_path / "hung.yaml", {"m": {
            "kind": "chat", "backend": "sim",
            "servers": [{"host": "127.0.0.1", "port": s.getsockname()[1]} for s in sockets]}})
        started = time.monotonic()
        code, body = report_json("-c", str(config), "--timeout", "1")
        elapsed = time.monotonic() - started
    finally:
        for s in sockets:
            s.close()
    assert code == 1
    assert [r["reason"] for r in body["servers"]] == ["timeout: no answer in 1 s"] * 10
    assert body["took_s"] < 5.0, body["took_s"]  # about 1 s; ten in a row would be 10 s
    assert elapsed < 15.0


def test_watch_refreshes_until_ctrl_c_and_exits_0(tmp_path: Path, fleet: Fleet) -> None:
    config = str(fleet_file(tmp_path, fleet))
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet", "report", "-c", config,
                             "--watch", "0.2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("MODEL"):
                seen += 1
                if seen == 2:  # refreshed at least once
                    break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen == 2
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def _run_in_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its stdout, as a person at a terminal would."""
    leader, follower = pty.openpty()
    base = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet", *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
                            env={**base, **env})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done writing
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_colour_in_a_terminal_unless_no_color(tmp_path: Path, fleet: Fleet) -> None:
    config = str(fleet_file(tmp_path, fleet))
    code, coloured = _run_in_terminal(["report", "-c", config], {"TERM": "xterm"})
    assert code == 0
    assert "\x1b[32mup\x1b[0m" in coloured and "\x1b[31mdown\x1b[0m" in coloured
    code, plain = _run_in_terminal(["report", "-c", config], {"NO_COLOR": "1", "TERM": "xterm"})
    assert code == 0
    assert "\x1b[" not in plain and " degraded " in plain

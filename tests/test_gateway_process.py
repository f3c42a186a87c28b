"""The gateway as a process: SIGTERM drains a stream in flight and exits 0, `--workers 2`
serves on one port and stops cleanly, bad settings exit 2 with a short message."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
from helpers import SimProcess, free_port, http_json, write_fleet

from modelfleet.testing import HOST, GatewayProcess


@pytest.fixture(scope="module")
def fleet_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sim = SimProcess(free_port(), "chat", flags={"speed": 5}).spawn()
    try:
        sim.wait_ready()
        folder = tmp_path_factory.mktemp("gateway-process")
        yield write_fleet(folder / "fleet.yaml", {
            "chat": {"backend": "sim", "servers": [{"host": HOST, "port": sim.port}]}},
            routing={"probe_interval_s": 1})
    finally:
        sim.close()


def stream_request(port: int, max_tokens: int) -> socket.socket:
    body = json.dumps({"model": "chat", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    return sock


def read_all(sock: socket.socket) -> bytes:
    seen = b""
    while data := sock.recv(65536):
        seen += data
        if b"data: [DONE]" in seen:
            break
    return seen


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(fleet_file: Path,
                                                              tmp_path: Path) -> None:
    gw = GatewayProcess(fleet_file, free_port(), log_path=tmp_path / "gw.log").spawn()
    try:
        gw.wait_ready()
        assert http_json(f"{gw.url}/health")[0] == 200
        sock = stream_request(gw.port, max_tokens=200)  # about a second at speed 5
        try:
            first = b""
            while b"data:" not in first:
                data = sock.recv(65536)
                assert data, first
                first += data
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            rest = read_all(sock)
        finally:
            sock.close()
        assert b"data: [DONE]" in first + rest  # the stream ran to its end
        assert gw.proc.wait(timeout=30) == 0, gw.output()
        log = gw.output()  # the drain began while the stream was in flight
        assert log.index("stopping") < log.index("POST /v1/chat/completions"), log
        with pytest.raises(OSError):  # and nothing listens any more
            socket.create_connection((HOST, gw.port), timeout=2).close()
    finally:
        gw.kill()


def test_two_workers_share_one_port_and_stop_cleanly(fleet_file: Path, tmp_path: Path) -> None:
    gw = GatewayProcess(fleet_file, free_port(), args=["--workers", "2"],
                        log_path=tmp_path / "gw.log").spawn()
    try:
        gw.wait_ready()
        assert gw.proc is not None
        parent = psutil.Process(gw.proc.pid)
        deadline = time.monotonic() + 30
        while True:  # both workers listen (each has the port open)
            workers = parent.children()
            listening = [w for w in workers
                         if any(c.laddr.port == gw.port and c.status == psutil.CONN_LISTEN
                                for c in w.net_connections("tcp"))]
            if len(listening) == 2:
                break
            assert time.monotonic() < deadline, f"{len(listening)} of 2 workers listen"
            time.sleep(0.1)
        api = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        for _ in range(6):
            answer = api.chat.completions.create(model="chat", max_tokens=2,
                                                 messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content
        assert gw.stop() == 0, gw.output()
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        gw.kill()


@pytest.mark.parametrize(("args", "says"), [
    (["--workers", "0"], "--workers"),
    (["--port", "70000"], "--port"),
    (["--drain-s", "soon"], "--drain-s"),
])
def test_bad_flags_exit_2_with_a_short_message(fleet_file: Path, args: list[str],
                                               says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "modelfleet", "gateway", "-c", str(fleet_file),
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr


def test_a_bad_gateway_section_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("gateway:\n  workers: 0\n  api_keys: [\"${UNSET_GATEWAY_KEY_VAR}\"]\n"
                    "models:\n  m: {backend: sim, servers: [{host: 127.0.0.1, port: 1}]}\n")
    done = subprocess.run([sys.executable, "-m", "modelfleet", "gateway", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "gateway.workers" in done.stderr and "UNSET_GATEWAY_KEY_VAR" in done.stderr
    assert "Traceback" not in done.stderr

"""`modelfleet demo` end to end: the real launcher, real sims, real traffic, on free ports.

Every process under the demo is recorded (psutil) while it runs, so the test can
check that all of them, including the server the launcher restarted, are gone
once the demo has exited.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from helpers import ROOT, free_port

DEFAULT_PORTS = (8101, 8102, 8103, 8201, 8202)


def demo_config(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    """The default fleet file, comments and all, with every port moved to a free one."""
    text = (ROOT / "client_config.yaml").read_text()
    ports = {old: free_port() for old in DEFAULT_PORTS}
    for old, new in ports.items():
        text = text.replace(f"port: {old}", f"port: {new}")
    path = tmp_path / "client_config.yaml"
    path.write_text(text)
    return path, ports


class Watched:
    """A subprocess whose descendants are recorded, by pid, until it exits."""

    def __init__(self, argv: list[str], **popen: object) -> None:
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)
        self.seen: dict[int, psutil.Process] = {}
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def record_descendants(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def wait_for_line(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output()}")
            self.record_descendants()
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.record_descendants()
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.kill_all()
            raise AssertionError(f"still running after {timeout} s:\n{self.output()}")
        self._reader.join(timeout=5)
        return self.proc.returncode

    def output(self) -> str:
        err = ""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()
        return "".join(self.lines) + err

    def left_behind(self) -> list[psutil.Process]:
        """Recorded descendants still alive a few seconds after the demo exited."""
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=5)
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def kill_all(self) -> None:
        for proc in [*self.seen.values()]:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_end_to_end_with_no_failed_request_and_leaves_nothing(tmp_path: Path) -> None:
    config, ports = demo_config(tmp_path)
    demo = Watched([sys.executable, "-m", "modelfleet", "demo", "--duration", "8",
                    "-c", str(config)])
    try:
        code = demo.wait(timeout=90)
        out = demo.output()
        assert code == 0, out
        summary = re.search(r"^demo: (\d+) requests, (\d+) failed", out, re.MULTILINE)
        assert summary, out
        assert int(summary.group(1)) > 50 and int(summary.group(2)) == 0, out
        assert "none left" in out
        # The story happened: a server was slowed, another killed and brought back.
        slow, killed = (f"127.0.0.1:{ports[8101]}", f"127.0.0.1:{ports[8102]}")
        assert f"{slow} made 10x slower" in out
        assert re.search(rf"{killed} killed \(SIGKILL pid \d+\)", out)
        assert f"{killed} is back" in out
        # The report came at the end, with every server answering.
        assert "ok: every model has a healthy server (5 of 5 answered)" in out
        # Recorded: the launcher, five guards, five sims, and the restarted server's pair.
        assert len(demo.seen) >= 12, demo.seen
        left = demo.left_behind()
        assert not left, [(p.pid, p.cmdline()) for p in left]
        assert not any(listening(p) for p in ports.values())
    finally:
        demo.kill_all()


def test_ctrl_c_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    config, ports = demo_config(tmp_path)
    # Its own session, so the interrupt can go to its whole process group, as a terminal's does.
    demo = Watched([sys.executable, "-m", "modelfleet", "demo", "--duration", "60",
                    "-c", str(config)], start_new_session=True)
    try:
        demo.wait_for_line(r"sending traffic", timeout=60)
        demo.record_descendants()
        assert len(demo.seen) >= 11  # the launcher, five guards, five sims
        os.killpg(demo.proc.pid, signal.SIGINT)
        code = demo.wait(timeout=40)
        out = demo.output()
        assert code == 130, out
        assert "demo interrupted" in out and "Traceback" not in out
        left = demo.left_behind()
        assert not left, [(p.pid, p.cmdline()) for p in left]
        assert not any(listening(p) for p in ports.values())
    finally:
        demo.kill_all()


def test_busy_ports_move_the_demo_to_a_copy_on_free_ports(tmp_path: Path) -> None:
    from modelfleet.cli.demo.fleet import prepare_fleet

    config, ports = demo_config(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", ports[8102]))
    blocker.listen(1)
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        out = io.StringIO()
        fleet = prepare_fleet(config, workdir, out)
    finally:
        blocker.close()
    assert fleet.path == workdir / "client_config.yaml"
    assert [old for old, _ in fleet.moved] == [f"127.0.0.1:{ports[8102]}"]
    assert f"ports {ports[8102]} are in use" in out.getvalue()
    new_port = int(fleet.moved[0][1].rsplit(":", 1)[1])
    assert new_port != ports[8102]
    servers = [s.port for s in fleet.config.models["llama-8b"].servers]
    assert servers == [ports[8101], new_port, ports[8103]]
    copy = fleet.path.read_text()
    assert "# a slower replica, to watch routing avoid it" in copy  # comments kept
    assert config.read_text().count(f"port: {ports[8102]}") == 1  # the user's file untouched


def test_demo_refuses_a_fleet_that_is_not_simulated(tmp_path: Path) -> None:
    from modelfleet.cli import main

    config = tmp_path / "gpu.yaml"
    config.write_text("models:\n  big:\n    backend: vllm\n    servers:\n"
                      "      - {host: 10.0.0.3, port: 8080, gpus: [0]}\n")
    assert main(["demo", "-c", str(config)]) == 2

"""The demo's fleet: which file, which ports, which servers to break; and the launcher
(`modelfleet serve`) running it as a subprocess, exactly as an operator would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from modelfleet.config import FleetConfig, ModelSpec, ServerSpec, find_config_path, load_config
from modelfleet.errors import ConfigError, FleetError, UsageError
from modelfleet.testing import free_port, port_is_free

READY_TIMEOUT_S = 60.0  # a cold laptop starting five Python servers
STOP_TIMEOUT_S = 20.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class DemoFleet:
    """The fleet file the demo launches (maybe a copy on free ports) and its chosen victims."""

    path: Path
    config: FleetConfig
    moved: tuple[tuple[str, str], ...]  # (address in the user's file, address used instead)
    chat_model: ModelSpec | None
    slow: ServerSpec | None  # made SLOWDOWN times slower at a third of the run
    kill: ServerSpec | None  # killed at half of the run


def default_config_path(explicit: str | None) -> Path:
    """-c, $MODELFLEET_CONFIG, ./client_config.yaml, else the repository's default fleet."""
    try:
        return find_config_path(explicit)
    except ConfigError:
        if explicit:
            raise
        bundled = Path(__file__).resolve().parents[3] / "client_config.yaml"  # the repository's
        if bundled.is_file():
            return bundled
        raise


def prepare_fleet(path: Path, workdir: Path, out: TextIO) -> DemoFleet:
    """Check the file is a local sim fleet; move it to free ports if its ports are taken."""
    config = load_config(path)
    for spec in config.models.values():
        if spec.backend != "sim":
            raise UsageError(
                f"the demo runs simulated servers only, and model {spec.name} has backend "
                f"{spec.backend}; run it on the default client_config.yaml (or a copy whose "
                "models all say `backend: sim`)")
        for server in spec.servers:
            if server.host not in LOCAL_HOSTS:
                raise UsageError(
                    f"the demo starts every server on this machine, and {spec.name} has a server "
                    f"on {server.host}; use 127.0.0.1 in the demo's fleet file")
    busy = [(spec.name, i, server) for spec in config.models.values()
            for i, server in enumerate(spec.servers) if not port_is_free(server.host, server.port)]
    moved: list[tuple[str, str]] = []
    if busy:
        from modelfleet.config import ConfigDocument

        copy = workdir / path.name
        shutil.copyfile(path, copy)
        document = ConfigDocument.open(copy)
        for name, index, server in busy:
            port = free_port(server.host)
            document.set(f"models.{name}.servers[{index}].port", str(port))
            moved.append((server.address, f"{server.host}:{port}"))
        document.save()
        ports = ", ".join(old.rsplit(":", 1)[1] for old, _ in moved)
        out.write(f"ports {ports} are in use here (another demo, or `modelfleet serve`?), so the "
                  f"demo runs on a copy of {path} with free ports instead: "
                  + ", ".join(f"{old} -> {new.rsplit(':', 1)[1]}" for old, new in moved) + "\n")
        path, config = copy, load_config(copy)
    chats = [m for m in config.models.values() if m.kind == "chat"]
    chat = max(chats, key=lambda m: len(m.servers), default=None)
    slow = chat.servers[0] if chat and len(chat.servers) >= 2 else None
    kill = chat.servers[1] if chat and len(chat.servers) >= 2 else None
    return DemoFleet(path=path, config=config, moved=tuple(moved), chat_model=chat,
                     slow=slow, kill=kill)


class LaunchedFleet:
    """`modelfleet serve` running in a subprocess, and everything it started."""

    def __init__(self, fleet: DemoFleet, workdir: Path) -> None:
        self.ready_file = workdir / "ready.json"
        self.output_path = workdir / "launcher.out"
        self.log_dir = workdir / "logs"
        argv = [sys.executable, "-m", "modelfleet", "serve", "-c", str(fleet.path),
                "--log-dir", str(self.log_dir), "--ready-file", str(self.ready_file),
                "--startsecs", "1", "--grace-s", "5"]
        self._output = self.output_path.open("wb")
        # Same process group as the demo: a Ctrl-C in the terminal reaches the launcher too,
        # which stops its servers even if this process could not.
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._output,
                                        stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float) -> dict[str, int]:
        """{address: pid} once every server is RUNNING; FleetError with the log tail if not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FleetError(f"the launcher exited with status {self.process.returncode} "
                                 f"before the fleet was up:\n{self.output_tail()}")
            pids = self.pids()
            if pids:
                return pids
            time.sleep(0.05)
        raise FleetError(f"the fleet was not up after {timeout_s:g} s:\n{self.output_tail()}")

    def pids(self) -> dict[str, int]:
        """Each server's pid as of the last time every server was RUNNING (the ready file)."""
        try:
            body = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return {}
        return {s["address"]: int(s["pid"]) for s in body.get("servers", []) if s.get("pid")}

    def output_tail(self, lines: int = 20) -> str:
        try:
            text = self.output_path.read_text(errors="replace")
        except OSError:
            return "(no launcher output)"
        return "\n".join("  " + line for line in text.splitlines()[-lines:])

    def stop(self) -> tuple[int, list[int]]:
        """SIGTERM the launcher, wait, and make sure every process it started is gone.

        Returns (processes that were running, pids still alive after all).
        """
        import psutil

        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._output.close()
        _, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if _still_running(p)]
        for proc in alive:  # only what this demo started, found by pid
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return len(tree), [p.pid for p in alive]


def _still_running(proc: object) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined]
    except psutil.Error:
        return False

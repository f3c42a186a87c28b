"""`serve_pipeline.py` starts the gateway beside this host's servers when the fleet file
says so (`gateway.launch_on`), supervises it like them and stops it with them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest
from helpers import ROOT, free_port, http_json
from ruamel.yaml import YAML

pytestmark = pytest.mark.timeout(90)


def test_the_launcher_starts_the_gateway_beside_its_servers_and_stops_both(
        tmp_path: Path) -> None:
    sim_port, gateway_port = free_port(), free_port()
    config = tmp_path / "fleet.yaml"
    YAML().dump({
        "routing": {"probe_interval_s": 1},
        "gateway": {"port": gateway_port, "launch_on": "127.0.0.1", "drain_s": 5},
        "models": {"chat": {"backend": "sim", "sim": {"speed": 100},
                            "servers": [{"host": "127.0.0.1", "port": sim_port}]}},
    }, config)
    out = tmp_path / "launcher.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve_pipeline.py"), "-c", str(config), "--log-dir",
             str(tmp_path / "logs"), "--grace-s", "5"], stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    root = psutil.Process(proc.pid)
    seen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while "all 2 servers RUNNING" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            seen += root.children(recursive=True)
            time.sleep(0.1)
        assert f"gateway 127.0.0.1:{gateway_port} RUNNING" in out.read_text()
        seen += root.children(recursive=True)
        url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 30
        while http_json(f"{url}/health")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = api.chat.completions.create(model="chat", max_tokens=3,
                                             messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()
        left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.cmdline() for p in left]
    finally:
        for p in [*seen, root]:
            try:
                p.kill()
            except psutil.Error:
                pass

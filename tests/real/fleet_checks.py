"""What the fleet tests read from real servers to judge the client and launcher by.

Every check compares modelfleet's claims with vLLM's own account: its /metrics counters
(requests by handler and status class, tokens) and the CPU binding of its worker
process, never with modelfleet's own bookkeeping.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

import psutil
from helpers import metric_value

WORKER_NAME = "VLLM::Worker"  # vLLM renames its model-runner process to this


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return r.read().decode()


def scrape_all(addresses: list[str]) -> dict[str, str]:
    return {a: scrape(a) for a in addresses}


def ok_requests(metrics: str, handler: str) -> float:
    return metric_value(metrics, "http_requests_total", {"handler": handler, "status": "2xx"})


def delta(before: Mapping[str, str], after: Mapping[str, str], name: str,
          labels: dict[str, str] | None = None) -> dict[str, float]:
    """Per server, how much counter `name` grew between two scrapes."""
    return {a: metric_value(after[a], name, labels) - metric_value(before[a], name, labels)
            for a in before}


def worker_affinity(launcher_pid: int, port: int) -> list[list[int]]:
    """The CPU sets of the vLLM workers of the engine listening on `port`."""
    found = []
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            argv = proc.cmdline()
        except psutil.Error:
            continue
        if "--port" in argv and argv[argv.index("--port") + 1] == str(port) and \
                any(a.endswith("api_server") for a in argv):
            for child in proc.children(recursive=True):
                try:
                    if child.name() == WORKER_NAME:
                        found.append(sorted(child.cpu_affinity()))
                except psutil.Error:
                    pass
    return found

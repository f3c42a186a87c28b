"""What one look at a discovery source saw: the servers that take requests, and those leaving."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    """A full view of a model's servers at one moment (never a delta: a missed one costs nothing).

    `ready`: (host, port) pairs that take new requests. `draining`: serving but
    terminating (a Kubernetes endpoint with serving=true, terminating=true): no new
    requests, those in flight finish. `error`: this lookup failed, and why; the
    client keeps its last known-good set (the lists are then not to be used).
    `source`: where it came from, in words ("dns llama.fleet.svc:8000").
    """

    ready: tuple[tuple[str, int], ...]
    draining: tuple[tuple[str, int], ...] = ()
    error: str | None = None
    source: str = ""

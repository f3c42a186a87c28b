"""The scenarios, by name, in the order a full run takes them."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable

from bench.scenarios.base import Context, Outcome

NAMES = ("heterogeneous", "degrade", "failures", "herd", "overhead", "cpu", "embeddings",
         "prefix", "tail", "chaos", "gateway", "scale-out")


def runner(name: str) -> Callable[[Context], Awaitable[Outcome]]:
    if name not in NAMES:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"bench.scenarios.{name.replace('-', '_')}").run

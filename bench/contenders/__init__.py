"""Who runs in the bench: names, families, and building one by name.

Names are what `--contenders` takes: an exact name (`modelfleet:peak_ewma`) or a family
(`modelfleet`, `litellm`, `raw`, `oracle`, or `builtin` for all but LiteLLM).
"""

from __future__ import annotations

from bench.contenders.base import Contender, Reply, Target, Tuning, Unavailable
from bench.contenders.litellm_router import STRATEGIES
from bench.contenders.modelfleet_client import POLICIES

RAW = "raw-aiohttp"
ORACLE = "oracle"
MODELFLEET = tuple(f"modelfleet:{p}" for p in POLICIES)
LITELLM = tuple(f"litellm:{s}" for s in STRATEGIES)
ALL = (RAW, ORACLE, *MODELFLEET, *LITELLM)
FAMILIES = {
    "raw": (RAW,),
    "oracle": (ORACLE,),
    "modelfleet": MODELFLEET,
    "litellm": LITELLM,
    "builtin": (RAW, ORACLE, *MODELFLEET),
    "all": ALL,
}

__all__ = ["ALL", "Contender", "Reply", "Target", "Tuning", "Unavailable", "build", "expand"]


def expand(spec: str) -> list[str]:
    """`"modelfleet,raw-aiohttp"` -> exact names, in the canonical order; ValueError if unknown."""
    wanted: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in FAMILIES:
            wanted.update(FAMILIES[part])
        elif part in ALL:
            wanted.add(part)
        else:
            raise ValueError(f"unknown contender {part!r}; use one of: "
                             f"{', '.join(FAMILIES)} or {', '.join(ALL)}")
    return [name for name in ALL if name in wanted]


def build(name: str) -> Contender:
    """A fresh, unopened contender; raises Unavailable if an optional package is missing."""
    if name == RAW:
        from bench.contenders.raw import RawAiohttp

        return RawAiohttp()
    if name == ORACLE:
        from bench.contenders.oracle import Oracle

        return Oracle()
    family, _, variant = name.partition(":")
    if family == "modelfleet":
        from bench.contenders.modelfleet_client import ModelfleetClient

        return ModelfleetClient(variant)
    if family == "litellm":
        from bench.contenders.litellm_router import LiteLLMRouter

        return LiteLLMRouter(variant)
    raise ValueError(f"unknown contender {name!r}")

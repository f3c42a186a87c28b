"""Who runs in the bench: names, families, and building one by name.

Names are what `--contenders` takes: an exact name (`modelfleet:peak_ewma`) or a family
(`modelfleet`, `litellm`, `raw`, `oracle`, `prefix`, or `builtin` for all but LiteLLM).

The `prefix` scenario's own contenders (peak_ewma with prefix awareness off and on, the
prefix-only hash router, eight independent client processes) run in that scenario only: the
other scenarios' fleets have no prefix cache for them to differ on.
"""

from __future__ import annotations

from bench.contenders.base import Contender, Reply, Target, Tuning, Unavailable
from bench.contenders.litellm_router import STRATEGIES
from bench.contenders.modelfleet_client import POLICIES

RAW = "raw-aiohttp"
ORACLE = "oracle"
MODELFLEET = tuple(f"modelfleet:{p}" for p in POLICIES)
LITELLM = tuple(f"litellm:{s}" for s in STRATEGIES)
PREFIX_OFF = "modelfleet:peak_ewma-noprefix"
PREFIX_ON = "modelfleet:peak_ewma+prefix"
PREFIX_HASH = "prefix-hash"
PREFIX_CLIENTS = "modelfleet:peak_ewma+prefix/8-clients"  # eight processes, run by the scenario
PREFIX_ONLY = (PREFIX_OFF, PREFIX_ON, PREFIX_HASH, PREFIX_CLIENTS)
# The prefix scenario's line-up, in its tables' order.
PREFIX = (ORACLE, "modelfleet:round_robin", "modelfleet:least_loaded", PREFIX_OFF, PREFIX_ON,
          PREFIX_HASH, PREFIX_CLIENTS)
ALL = (RAW, ORACLE, *MODELFLEET, *LITELLM)
EVERY = (*ALL, *PREFIX_ONLY)
FAMILIES = {
    "raw": (RAW,),
    "oracle": (ORACLE,),
    "modelfleet": (*MODELFLEET, PREFIX_OFF, PREFIX_ON, PREFIX_CLIENTS),
    "litellm": LITELLM,
    "prefix": PREFIX,
    "builtin": (RAW, ORACLE, *MODELFLEET, *PREFIX_ONLY),
    "all": EVERY,
}

__all__ = ["ALL", "EVERY", "PREFIX", "PREFIX_ONLY", "Contender", "Reply", "Target", "Tuning",
           "Unavailable", "build", "expand"]


def expand(spec: str) -> list[str]:
    """`"modelfleet,raw-aiohttp"` -> exact names, in the canonical order; ValueError if unknown."""
    wanted: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in FAMILIES:
            wanted.update(FAMILIES[part])
        elif part in EVERY:
            wanted.add(part)
        else:
            raise ValueError(f"unknown contender {part!r}; use one of: "
                             f"{', '.join(FAMILIES)} or {', '.join(EVERY)}")
    return [name for name in EVERY if name in wanted]


def build(name: str) -> Contender:
    """A fresh, unopened contender; raises Unavailable if an optional package is missing."""
    if name == RAW:
        from bench.contenders.raw import RawAiohttp

        return RawAiohttp()
    if name == ORACLE:
        from bench.contenders.oracle import Oracle

        return Oracle()
    if name in (PREFIX_OFF, PREFIX_ON):
        from bench.contenders.modelfleet_client import ModelfleetClient

        return ModelfleetClient("peak_ewma", prefix_aware=name == PREFIX_ON, name=name)
    if name == PREFIX_HASH:
        from bench.contenders.prefix_hash import PrefixHash

        return PrefixHash()
    if name == PREFIX_CLIENTS:
        raise ValueError(f"{name} is eight processes, each with its own {PREFIX_ON}: the prefix "
                         f"scenario starts them (build {PREFIX_ON} in each)")
    family, _, variant = name.partition(":")
    if family == "modelfleet":
        from bench.contenders.modelfleet_client import ModelfleetClient

        return ModelfleetClient(variant)
    if family == "litellm":
        from bench.contenders.litellm_router import LiteLLMRouter

        return LiteLLMRouter(variant)
    raise ValueError(f"unknown contender {name!r}")

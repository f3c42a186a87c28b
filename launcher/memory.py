"""How much GPU memory each server may take, and which servers must start one after another.

Engines take a fraction of the GPU's *total* memory (vLLM's
`--gpu-memory-utilization`, SGLang's `--mem-fraction-static`) and refuse to
start when less than that is free, so the launcher plans the fractions up front
and waits for exactly that much free memory:

- a server with `min_free_memory_gb` needs that much free on each of its GPUs,
  and takes that much (fraction = need / total);
- a fraction given in `backend_args` is kept, and its share of the total is
  what the server needs free;
- every other server shares its GPU's default budget (vLLM 0.9, SGLang 0.85 of
  the total, the engines' own defaults) with the other such servers on that
  GPU, after what the explicit ones claim: two replicas on one GPU get 0.45
  each;
- a plan whose servers together need more than a GPU has is refused, naming
  the GPU and what each server needs, because it could never start.

The sim needs no GPU memory unless `min_free_memory_gb` says so (tests use that
to exercise the waiting) and never receives a fraction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelfleet.errors import UsageError

from .gpus import GpuState
from .hosts import LocalServer

DEFAULT_FRACTION = {"vllm": 0.9, "sglang": 0.85}
FRACTION_FLAG = {"vllm": "gpu-memory-utilization", "sglang": "mem-fraction-static"}


class MemoryPlanError(UsageError):
    """The servers cannot fit on their GPUs, whatever else runs there."""


@dataclass(frozen=True)
class MemoryShare:
    """One server's slice: the fraction for its engine and what each GPU must have free first."""

    fraction: float | None = None
    need_gb: tuple[tuple[int, float], ...] = ()  # (GPU index, GB free it waits for)


def user_flag(backend_args: Mapping[str, object], flag: str) -> object | None:
    """The value of `flag` in backend_args, however the user spelled it (dashes or underscores)."""
    for key, value in backend_args.items():
        if str(key).lstrip("-").replace("_", "-") == flag:
            return value
    return None


def floor_fraction(value: float) -> float:
    """Round down, so the engine never asks for more than was seen free."""
    return math.floor(value * 1000 + 1e-9) / 1000


def plan_memory(
    servers: Sequence[LocalServer], gpus: Mapping[int, GpuState] | None
) -> dict[tuple[str, str, int], MemoryShare]:
    """Every server's MemoryShare; `gpus` is None when no GPU is probed (then nobody waits)."""
    plan = {s.key: MemoryShare() for s in servers}
    on_gpu = [s for s in servers if s.on_gpu] if gpus is not None else []
    if not on_gpu:
        return plan
    assert gpus is not None
    for s in on_gpu:
        missing = [g for g in s.server.gpus if g not in gpus]
        if missing:
            raise MemoryPlanError(
                f"{s.label}: GPU {missing[0]} does not exist here (this machine has GPU "
                f"{', '.join(str(i) for i in sorted(gpus))})"
            )

    explicit: dict[tuple[str, str, int], dict[int, float]] = {}
    fractions: dict[tuple[str, str, int], float | None] = {}
    for s in on_gpu:
        totals = {g: gpus[g].total_gb for g in s.server.gpus}
        flag = FRACTION_FLAG.get(s.model.backend)
        given = user_flag(s.model.backend_args, flag) if flag else None
        if given is not None:
            fraction = float(given)  # type: ignore[arg-type]
            fractions[s.key] = fraction
            explicit[s.key] = {g: fraction * t for g, t in totals.items()}
        if s.server.min_free_memory_gb is not None:
            need = float(s.server.min_free_memory_gb)
            for g, total in totals.items():
                if need > total:
                    raise MemoryPlanError(
                        f"{s.label}: min_free_memory_gb is {need:g} but GPU {g} ({gpus[g].name}) "
                        f"has {total:.1f} GB in all; lower it or use a larger GPU"
                    )
            explicit[s.key] = dict.fromkeys(totals, need)
            if flag and given is None:
                fractions[s.key] = floor_fraction(need / max(totals.values()))
        if s.model.backend == "sim" and s.key not in explicit:
            explicit[s.key] = {}  # the sim takes no memory
            fractions[s.key] = None
        fractions.setdefault(s.key, None)

    shared = [s for s in on_gpu if s.key not in explicit]
    shared_need: dict[tuple[str, str, int], dict[int, float]] = {}
    for s in shared:
        shares = []
        for g in s.server.gpus:
            total = gpus[g].total_gb
            sharers = [o for o in shared if g in o.server.gpus]
            budget = total * min(DEFAULT_FRACTION[o.model.backend] for o in sharers)
            claimed = sum(explicit[o.key].get(g, 0.0) for o in on_gpu if o.key in explicit)
            shares.append((budget - claimed) / len(sharers) / total)
        fraction = floor_fraction(min(shares))
        if fraction <= 0.01:
            raise MemoryPlanError(
                f"{s.label}: nothing left on GPU {', '.join(map(str, s.server.gpus))} once the "
                "servers with min_free_memory_gb have their share; lower their min_free_memory_gb"
            )
        fractions[s.key] = fraction
        shared_need[s.key] = {g: fraction * gpus[g].total_gb for g in s.server.gpus}
    explicit.update(shared_need)

    for g in sorted({g for s in on_gpu for g in s.server.gpus}):
        users = [(s, explicit[s.key].get(g, 0.0)) for s in on_gpu if g in s.server.gpus]
        total_need = sum(need for _, need in users)
        if total_need > gpus[g].total_gb + 1e-6:
            detail = ", ".join(f"{s.label} needs {need:.1f} GB" for s, need in users)
            raise MemoryPlanError(
                f"the servers on GPU {g} ({gpus[g].name}, {gpus[g].total_gb:.1f} GB) cannot fit: "
                f"{detail}, {total_need:.1f} GB in all; lower min_free_memory_gb or move a server"
            )

    for s in on_gpu:
        need = tuple((g, gb) for g, gb in sorted(explicit[s.key].items()) if gb > 0)
        plan[s.key] = MemoryShare(fraction=fractions[s.key], need_gb=need)
    return plan


def start_groups(servers: Sequence[LocalServer]) -> list[list[LocalServer]]:
    """Servers linked by a shared GPU, which must start one at a time; others start alone.

    vLLM profiles free memory while it starts and aborts if another process
    allocates meanwhile, so starts (and restarts) on one GPU are serialised.
    """
    groups: list[list[LocalServer]] = []
    gpu_group: dict[int, list[LocalServer]] = {}
    for s in servers:
        touching = []
        for g in s.server.gpus if s.on_gpu else ():
            group = gpu_group.get(g)
            if group is not None and all(group is not t for t in touching):
                touching.append(group)
        if not touching:
            group = [s]
            groups.append(group)
        else:
            group = touching[0]
            for other in touching[1:]:  # s joins GPUs that were apart so far: merge
                group.extend(other)
                groups.remove(other)
                for g, owner in gpu_group.items():
                    if owner is other:
                        gpu_group[g] = group
            group.append(s)
        for g in s.server.gpus if s.on_gpu else ():
            gpu_group[g] = group
    order = {s.key: i for i, s in enumerate(servers)}
    for group in groups:
        group.sort(key=lambda s: order[s.key])
    return groups

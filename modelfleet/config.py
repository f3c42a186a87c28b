"""The fleet file: parsed, checked strictly, and edited, all through this module.

One YAML library (ruamel.yaml) reads and edits the file so that every error can
name its line and every edit keeps the user's comments. Everything else in
modelfleet sees only the frozen dataclasses below.

INTERFACE CONTRACT (other modules rely on these names; the parser fills them):
  load_config(path=None, *, resolve_env=True) -> FleetConfig
  find_config_path(explicit: str | Path | None) -> Path   (-c, $MODELFLEET_CONFIG, ./client_config.yaml)
  parse_config(text: str, filename: str, *, resolve_env=True) -> FleetConfig
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("peak_ewma", "fastest", "least_loaded", "round_robin", "random")
BACKENDS = ("vllm", "sglang", "sim")
KINDS = ("chat", "embedding")
DEVICES = ("gpu", "cpu")


@dataclass(frozen=True)
class RoutingSpec:
    """How the client picks servers and when it gives up on one."""

    policy: str = "peak_ewma"
    latency_growing_rate: float = 2.0
    max_retry: int = 5
    request_timeout_s: float = 600.0
    probe_interval_s: float = 5.0
    stall_timeout_s: float = 5.0
    # Retries allowed as a fraction of recent requests (Finagle's RetryBudget), plus a
    # small per-second floor so a quiet client can still retry.
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0


@dataclass(frozen=True)
class BenchmarkSpec:
    """What background probes send: kept tiny so probing costs the fleet nothing."""

    messages: tuple[Mapping[str, str], ...] = ({"role": "user", "content": "Say OK."},)
    embedding_input: str = "benchmark sentence"
    max_tokens: int = 8


@dataclass(frozen=True)
class SimSpec:
    """Settings of the simulated engine (backend `sim`); mirrors `modelfleet sim` flags."""

    speed: float = 1.0
    batch_slowdown: float = 0.02
    dim: int = 384
    max_batch: int = 64
    seed: int = 0


@dataclass(frozen=True)
class ServerSpec:
    """One server of a model. Only host and port matter to the client; the rest to the launcher."""

    host: str
    port: int
    gpus: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()
    min_free_memory_gb: float | None = None
    sim: SimSpec | None = None  # per-server override of the model's sim settings
    line: int | None = None  # where it stands in the file, for messages

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class ModelSpec:
    """A model and every server that serves it."""

    name: str
    servers: tuple[ServerSpec, ...]
    kind: str = "chat"
    aliases: tuple[str, ...] = ()
    model_path: str | None = None  # what the engine loads; defaults to the name
    served_name: str = ""  # the `model` on the wire; defaults to the name
    backend: str = "vllm"
    api_key: str | None = field(default=None, repr=False)  # never printed
    backend_args: Mapping[str, Any] = field(default_factory=dict)
    sim: SimSpec = SimSpec()
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for the engine
    python: str | None = None  # interpreter that runs the engine as `python -m <module>`
    command: tuple[str, ...] | None = None  # full argv override for the engine
    device: str = "gpu"  # gpu | cpu: cpu skips NVML entirely

    @property
    def wire_name(self) -> str:
        return self.served_name or self.name

    def sim_for(self, server: ServerSpec) -> SimSpec:
        return server.sim or self.sim


@dataclass(frozen=True)
class FleetConfig:
    """The whole fleet, as read from one file."""

    models: Mapping[str, ModelSpec]
    routing: RoutingSpec = RoutingSpec()
    benchmark: BenchmarkSpec = BenchmarkSpec()
    path: Path | None = None

    def resolve_model(self, name: str) -> ModelSpec:
        """Find a model by its key or an alias; raises UnknownModel listing the known names."""
        from modelfleet.errors import UnknownModel

        if name in self.models:
            return self.models[name]
        for spec in self.models.values():
            if name in spec.aliases:
                return spec
        raise UnknownModel(name, list(self.models))

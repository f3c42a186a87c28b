"""The exact argv and environment each server is started with, built from the config alone.

Pure functions, so `--dry-run` prints what a real start would run. Argv is
always a list (never a shell string), and secrets travel only in the
environment, which other users cannot read in `ps`: vLLM reads
`VLLM_API_KEY`, the sim `SIM_API_KEY`; SGLang has no such variable, so its key
goes through `MODELFLEET_API_KEY` and a three-line shim (`SGLANG_KEY_SHIM`)
that appends `--api-key` inside the interpreter, where /proc/PID/cmdline
cannot see it.

`backend_args` become flags the way the engines' argparse parsers read them:
`key: value` -> `--key value`; `key: true` -> `--key`; `key: false` or null ->
omitted (write `no-key: true` where the engine has a negative flag); a list ->
`--key v1 v2` (one flag, several values: both engines declare their list
options with `nargs="+"`); a mapping -> `--key '{"json": ...}'` (one JSON
argument, as vLLM's `--override-generation-config` and friends expect). A
flag the launcher would add itself (memory fraction, tensor parallel size,
`--enable-metrics`, the sim's settings) is left to the user's value when
backend_args names it; host, port, model and api key come only from the
server entry.

Per model, `python: /venv/bin/python` runs the engine as `python -m <entry
module>` from that interpreter (vLLM: `vllm.entrypoints.openai.api_server
--model PATH`, SGLang: `sglang.launch_server`, sim: `modelfleet sim`), and
`command: [...]` replaces the whole argv; in it `{host}`, `{port}`,
`{model_path}`, `{served_name}`, `{memory_fraction}`, `{tp_size}`, `{gpus}`
and `{cpus}` are filled in. `device: cpu` drops the GPU flags and CUDA
variables (and tells SGLang `--device cpu`); a server's `cpus: [0, 1]` binds a CPU engine's threads
(`VLLM_CPU_OMP_THREADS_BIND=0-1`, SGLang's `SGLANG_CPU_OMP_THREADS_BIND`) the
way `gpus` sets `CUDA_VISIBLE_DEVICES`, and the guard sets the CPU affinity of
the whole engine process to those CPUs (its children inherit it): vLLM-CPU's
engine core busy-waits outside the OpenMP threads and would otherwise take a
core of the replica next to it. The model's `env:` is added last
but one (before the key), so it can override anything else the launcher sets.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from modelfleet.config import GatewaySpec
from modelfleet.errors import UsageError

from .hosts import LocalServer
from .memory import FRACTION_FLAG, MemoryShare

ENTRY_MODULE = {
    "vllm": "vllm.entrypoints.openai.api_server",
    "sglang": "sglang.launch_server",
    "sim": "modelfleet",
}
API_KEY_ENV = {"vllm": "VLLM_API_KEY", "sglang": "MODELFLEET_API_KEY", "sim": "SIM_API_KEY"}
CPU_BIND_ENV = {"vllm": "VLLM_CPU_OMP_THREADS_BIND", "sglang": "SGLANG_CPU_OMP_THREADS_BIND"}
TP_FLAGS = {"vllm": ("tensor-parallel-size", "tp", "tp-size"), "sglang": ("tp-size", "tp")}
# Set from the server entry only: a second --port would make /health look at the wrong place,
# and a key on the command line would show in `ps`.
RESERVED_FLAGS = ("host", "port", "model", "model-path", "served-model-name", "api-key")

SGLANG_KEY_SHIM = (
    "import os, runpy, sys; module = sys.argv[1]; "
    "sys.argv = [module, *sys.argv[2:], '--api-key', os.environ.pop('MODELFLEET_API_KEY')]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
PLACEHOLDER = re.compile(r"\{(host|port|model_path|served_name|memory_fraction|tp_size|gpus|cpus)\}")
MASK = "***"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one server, and to show it without its secrets."""

    key: tuple[str, str, int]
    label: str  # "llama-8b 10.0.0.3:8080"
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)  # set on top of the launcher's own environment
    secret_env: tuple[str, ...]  # names in env whose values are never shown
    health_url: str
    log_path: Path
    gpus: tuple[int, ...] = ()  # GPUs it starts on (one start at a time per GPU)
    need_gb: tuple[tuple[int, float], ...] = ()  # free memory to wait for, per GPU
    memory_fraction: float | None = None
    cpus: tuple[int, ...] = ()  # CPU affinity of the whole engine (its children inherit it)

    def shown_env(self) -> dict[str, str]:
        return {k: MASK if k in self.secret_env else v for k, v in sorted(self.env.items())}

    def shown_argv(self) -> str:
        secrets = {self.env[k] for k in self.secret_env if self.env.get(k)}
        return shlex.join(MASK if arg in secrets else arg for arg in self.argv)

    def secrets(self) -> tuple[str, ...]:
        return tuple(self.env[k] for k in self.secret_env if self.env.get(k))


def cpu_list(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5", the list syntax of VLLM_CPU_OMP_THREADS_BIND and taskset."""
    ordered = sorted(set(cpus))
    runs: list[list[int]] = []
    for cpu in ordered:
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # YAML numbers may arrive as floats; an engine's int field wants 2, not 2.0
    return value


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(_plain(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # YAML numbers may arrive as floats; `--max-model-len 4096`, not 4096.0
    return str(value)


def flag_name(key: object) -> str:
    return str(key).lstrip("-").replace("_", "-")


def backend_flags(backend_args: Mapping[str, object], model: str) -> list[str]:
    """backend_args as engine flags (rules in the module docstring)."""
    argv: list[str] = []
    for key, value in backend_args.items():
        name = str(key).lstrip("-")
        if flag_name(name) in RESERVED_FLAGS:
            hint = (
                "put the key in the model's `api_key:`; it is passed through the environment so it never shows in ps"
                if flag_name(name) == "api-key"
                else "it comes from the model and server entries"
            )
            raise UsageError(f"models.{model}.backend_args.{key}: the launcher sets --{flag_name(name)}; {hint}")
        flag = f"--{name}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            if value:
                argv += [flag, *(_scalar(v) for v in value)]
        elif isinstance(value, Mapping):
            argv += [flag, json.dumps(_plain(value))]
        else:
            argv += [flag, _scalar(value)]
    return argv


def _engine_flags(local: LocalServer, share: MemoryShare) -> list[tuple[str, list[str]]]:
    """The flags the launcher adds itself, as (name, values), before the user's are merged in."""
    model, server = local.model, local.server
    backend = model.backend
    flags: list[tuple[str, list[str]]] = [
        ("host", [local.bind_host]),
        ("port", [str(server.port)]),
    ]
    if backend == "sim":
        sim = model.sim_for(server)
        flags += [
            ("model", [model.wire_name]),
            ("kind", [model.kind]),
            ("speed", [_scalar(sim.speed)]),
            ("batch-slowdown", [_scalar(sim.batch_slowdown)]),
            ("dim", [str(sim.dim)]),
            ("max-batch", [str(sim.max_batch)]),
            ("seed", [str(sim.seed)]),
            *([("kv-cache-tokens", [str(sim.kv_cache_tokens)])] if sim.kv_cache_tokens else []),
        ]
        return flags
    flags.append(("served-model-name", [model.wire_name]))
    if model.device == "gpu":
        if share.fraction is not None:
            flags.append((FRACTION_FLAG[backend], [f"{share.fraction:g}"]))
        if server.gpus:
            flags.append((TP_FLAGS[backend][0], [str(len(server.gpus))]))
    if backend == "sglang":
        if model.device == "cpu":
            flags.append(("device", ["cpu"]))  # vLLM picks its device from the build it is
        flags.append(("enable-metrics", []))  # SGLang serves /metrics only with it
    return flags


def _merge(ours: list[tuple[str, list[str]]], backend_args: Mapping[str, object], backend: str) -> list[str]:
    given = {flag_name(k) for k in backend_args}
    aliases = set(TP_FLAGS.get(backend, ()))
    argv: list[str] = []
    for name, values in ours:
        if name in given or (name in aliases and given & aliases):
            continue  # the user's value wins
        argv += [f"--{name}", *values]
    return argv


def _fill(command: Sequence[str], local: LocalServer, share: MemoryShare) -> list[str]:
    model, server = local.model, local.server
    values = {
        "host": local.bind_host,
        "port": str(server.port),
        "model_path": model.model_path or model.name,
        "served_name": model.wire_name,
        "memory_fraction": "" if share.fraction is None else f"{share.fraction:g}",
        "tp_size": str(max(1, len(server.gpus))),
        "gpus": ",".join(map(str, server.gpus)),
        "cpus": cpu_list(server.cpus),
    }
    return [PLACEHOLDER.sub(lambda m: values[m.group(1)], str(arg)) for arg in command]


def default_vllm() -> str:
    """`vllm` from the launcher's own environment when it is there, else from PATH."""
    beside = Path(sys.executable).with_name("vllm")
    return str(beside) if beside.exists() else "vllm"


def build_argv(local: LocalServer, share: MemoryShare) -> list[str]:
    model = local.model
    backend = model.backend
    if model.command:
        return _fill(model.command, local, share)
    flags = _merge(_engine_flags(local, share), model.backend_args, backend)
    flags += backend_flags(model.backend_args, model.name)
    path = model.model_path or model.name
    python = model.python or sys.executable
    if backend == "vllm":
        if model.python:
            return [python, "-m", ENTRY_MODULE["vllm"], "--model", path, *flags]
        return [default_vllm(), "serve", path, *flags]
    if backend == "sglang":
        flags = ["--model-path", path, *flags]
        if model.api_key:
            return [python, "-c", SGLANG_KEY_SHIM, ENTRY_MODULE["sglang"], *flags]
        return [python, "-m", ENTRY_MODULE["sglang"], *flags]
    if backend == "sim":
        return [python, "-m", ENTRY_MODULE["sim"], "sim", *flags]
    raise UsageError(f"models.{model.name}.backend: unknown backend {backend!r} (vllm, sglang, sim)")


def build_env(local: LocalServer) -> tuple[dict[str, str], tuple[str, ...]]:
    """The variables set on top of the launcher's environment, and which of them are secret."""
    model, server = local.model, local.server
    env: dict[str, str] = {}
    if model.backend != "sim" and model.device == "gpu":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so CUDA numbers GPUs the way NVML does
        if server.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in server.gpus)
    if server.cpus and model.backend in CPU_BIND_ENV:
        env[CPU_BIND_ENV[model.backend]] = cpu_list(server.cpus)
    env.update({str(k): str(v) for k, v in model.env.items()})
    secret: tuple[str, ...] = ()
    if model.api_key:
        name = API_KEY_ENV[model.backend]
        env[name] = model.api_key
        secret = (name,)
    return env, secret


def build_launch(local: LocalServer, share: MemoryShare, log_dir: Path) -> LaunchSpec:
    env, secret = build_env(local)
    host = local.health_host
    host = f"[{host}]" if ":" in host else host
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", local.model.name)
    return LaunchSpec(
        key=local.key,
        label=local.label,
        argv=tuple(build_argv(local, share)),
        env=MappingProxyType(env),
        secret_env=secret,
        health_url=f"http://{host}:{local.server.port}/health",
        log_path=log_dir / f"{slug}-{local.server.port}.log",
        gpus=tuple(local.server.gpus) if local.on_gpu else (),
        need_gb=share.need_gb,
        memory_fraction=share.fraction,
        cpus=tuple(local.server.cpus),
    )


GATEWAY_NAME = "gateway"  # its key and label in the supervisor, beside the servers'


def build_gateway_launch(config_path: Path, gateway: GatewaySpec, log_dir: Path) -> LaunchSpec:
    """`modelfleet gateway -c FILE` beside this host's servers (`gateway.launch_on`).

    It reads the fleet file itself (its keys from the launcher's environment, as the
    servers get theirs); it is ready once it listens (`/livez`), whether or not the
    servers are up yet: its /health says that."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(gateway.host, gateway.host)
    host = f"[{host}]" if ":" in host else host
    return LaunchSpec(
        key=(GATEWAY_NAME, gateway.host, gateway.port),
        label=f"{GATEWAY_NAME} {gateway.host}:{gateway.port}",
        argv=(sys.executable, "-m", "modelfleet", "gateway", "-c", str(config_path.resolve())),
        env=MappingProxyType({}),
        secret_env=(),
        health_url=f"http://{host}:{gateway.port}/livez",
        log_path=log_dir / f"{GATEWAY_NAME}-{gateway.port}.log",
    )

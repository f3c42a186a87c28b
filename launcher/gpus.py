"""How much memory this machine's GPUs have free: from NVML, or from a described file.

The launcher waits for free GPU memory before it starts a server, so it must
read it; NVML (the NVIDIA driver's management library, through nvidia-ml-py's
`pynvml`) is the source of truth on GPU hosts. Machines without GPUs (laptops,
CI, the demo) describe their GPUs in a small YAML file instead, re-read on every
poll so that rewriting it frees memory; everything that file drives is labelled
simulated, so nobody mistakes it for a real GPU.

Sizes are GB meaning GiB (2**30 bytes), as vLLM and nvidia-smi print them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from modelfleet.errors import GpuProbeError

GIB = 1024**3

DESCRIBED_FORMAT = "gpus: [{index: 0, name: H100, total_gb: 80, free_gb: 80}]"


@dataclass(frozen=True)
class GpuState:
    """One GPU as read at one moment."""

    index: int
    name: str
    total_gb: float
    free_gb: float
    pids: tuple[int, ...] = ()  # processes holding memory on it (NVML only)


class GpuProbe(Protocol):
    """Reads every GPU's memory; `simulated` says whether the numbers are made up."""

    simulated: bool
    source: str

    def read(self) -> Mapping[int, GpuState]: ...

    def close(self) -> None: ...


def nvml_unavailable_message(reason: str, needed_by: str = "") -> str:
    """One paragraph: what failed, why NVML is needed, and the two ways around it."""
    who = f" (needed by {needed_by})" if needed_by else ""
    return (
        f"cannot read this machine's GPUs: NVML failed: {reason}. Servers of vllm or sglang "
        f"models that list `gpus`{who} are started only once their GPUs have the free memory "
        "they need, which the launcher reads through NVML; NVML comes with the NVIDIA driver "
        "(and the nvidia-ml-py package). On a machine without NVIDIA GPUs, describe GPUs in a "
        f"file and pass --fake-gpus gpus.yaml (format: `{DESCRIBED_FORMAT}`; everything it "
        "drives is labelled simulated), or set `device: cpu` on models that run on the CPU."
    )


class NvmlProbe:
    """The real GPUs, through NVML; kept to the few calls the launcher needs."""

    simulated = False
    source = "NVML"

    def __init__(self, needed_by: str = "") -> None:
        try:
            import pynvml
        except ImportError as exc:  # nvidia-ml-py is a runtime dependency, but be clear anyway
            raise GpuProbeError(nvml_unavailable_message(f"pynvml is not importable ({exc})", needed_by)) from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuProbeError(nvml_unavailable_message(str(exc), needed_by)) from None
        self._nvml = pynvml

    def read(self) -> dict[int, GpuState]:
        nvml = self._nvml
        try:
            gpus = {}
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:  # only for messages; some GPUs (MIG, vGPU) do not report processes
                    processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                except nvml.NVMLError:
                    processes = []
                gpus[index] = GpuState(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_gb=memory.total / GIB,
                    free_gb=memory.free / GIB,
                    pids=tuple(p.pid for p in processes),
                )
            return gpus
        except nvml.NVMLError as exc:
            raise GpuProbeError(f"reading GPU memory through NVML failed: {exc}") from None

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


class DescribedGpuProbe:
    """GPUs described in a YAML file (`--fake-gpus`), re-read on every poll."""

    simulated = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.source = f"simulated GPUs described in {self.path}"
        self.read()  # a bad file is a usage error at startup, not a surprise later

    def read(self) -> dict[int, GpuState]:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import YAMLError

        try:
            text = self.path.read_text()
        except OSError as exc:
            raise GpuProbeError(f"--fake-gpus {self.path}: cannot read it: {exc.strerror}") from None
        try:
            doc = YAML(typ="safe").load(text)
        except YAMLError as exc:
            raise GpuProbeError(f"--fake-gpus {self.path}: not valid YAML: {exc}") from None
        return parse_described_gpus(doc, str(self.path))

    def close(self) -> None:
        pass


def parse_described_gpus(doc: object, where: str) -> dict[int, GpuState]:
    """Check a described-GPU document strictly, naming the entry and key that is wrong."""

    def problem(path: str, message: str) -> GpuProbeError:
        return GpuProbeError(f"--fake-gpus {where}: {path}: {message} (format: {DESCRIBED_FORMAT})")

    if not isinstance(doc, dict) or set(doc) != {"gpus"}:
        raise problem("(top)", "must be a mapping with one key, `gpus`")
    entries = doc["gpus"]
    if not isinstance(entries, list) or not entries:
        raise problem("gpus", "must be a non-empty list of GPUs")
    gpus: dict[int, GpuState] = {}
    for i, entry in enumerate(entries):
        at = f"gpus[{i}]"
        if not isinstance(entry, dict):
            raise problem(at, "must be a mapping")
        unknown = set(entry) - {"index", "name", "total_gb", "free_gb"}
        if unknown:
            raise problem(f"{at}.{sorted(unknown)[0]}", "unknown key (known: index, name, total_gb, free_gb)")
        index = entry.get("index", i)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise problem(f"{at}.index", f"must be a whole number >= 0, got {index!r}")
        if index in gpus:
            raise problem(f"{at}.index", f"GPU {index} is described twice")
        name = entry.get("name", "GPU")
        if not isinstance(name, str):
            raise problem(f"{at}.name", f"must be text, got {name!r}")
        total = entry.get("total_gb")
        if isinstance(total, bool) or not isinstance(total, (int, float)) or total <= 0:
            raise problem(f"{at}.total_gb", f"must be a number > 0, got {total!r}")
        free = entry.get("free_gb", total)
        if isinstance(free, bool) or not isinstance(free, (int, float)) or not 0 <= free <= total:
            raise problem(f"{at}.free_gb", f"must be a number from 0 to total_gb ({total}), got {free!r}")
        gpus[index] = GpuState(index=index, name=name, total_gb=float(total), free_gb=float(free))
    return gpus

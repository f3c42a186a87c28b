"""GPU probing: the described-GPU file (read fresh each time, checked strictly) and NVML's absence."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelfleet.launcher.gpus import DescribedGpuProbe, NvmlProbe

from modelfleet.errors import GpuProbeError


def test_described_file_is_read_again_on_every_poll(tmp_path: Path):
    path = tmp_path / "gpus.yaml"
    path.write_text("gpus:\n  - {index: 0, name: H100, total_gb: 80, free_gb: 12}\n"
                    "  - {index: 1, name: A100, total_gb: 40}\n")
    probe = DescribedGpuProbe(path)
    assert probe.simulated and "simulated" in probe.source
    first = probe.read()
    assert (first[0].name, first[0].total_gb, first[0].free_gb) == ("H100", 80.0, 12.0)
    assert first[1].free_gb == 40.0  # free defaults to total
    path.write_text("gpus:\n  - {index: 0, name: H100, total_gb: 80, free_gb: 70}\n")
    assert probe.read()[0].free_gb == 70.0 and 1 not in probe.read()


@pytest.mark.parametrize(("text", "expected"), [
    ("gpu: []\n", "(top): must be a mapping with one key, `gpus`"),
    ("gpus: []\n", "gpus: must be a non-empty list"),
    ("gpus:\n  - {index: 0, total_gb: 80, free: 3}\n", "gpus[0].free: unknown key"),
    ("gpus:\n  - {index: -1, total_gb: 80}\n", "gpus[0].index: must be a whole number >= 0, got -1"),
    ("gpus:\n  - {index: 0, total_gb: 80}\n  - {index: 0, total_gb: 80}\n", "gpus[1].index: GPU 0 is described twice"),
    ("gpus:\n  - {index: 0, total_gb: lots}\n", "gpus[0].total_gb: must be a number > 0, got 'lots'"),
    ("gpus:\n  - {index: 0, total_gb: 80, free_gb: -1}\n", "gpus[0].free_gb: must be a number from 0 to total_gb (80), got -1"),
    ("gpus: [ {index: 0\n", "not valid YAML"),
])
def test_described_file_errors_name_the_entry_and_key(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "gpus.yaml"
    path.write_text(text)
    with pytest.raises(GpuProbeError) as info:
        DescribedGpuProbe(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_missing_described_file_is_a_probe_error(tmp_path: Path):
    with pytest.raises(GpuProbeError, match="cannot read it"):
        DescribedGpuProbe(tmp_path / "nope.yaml")


def test_nvml_probe_reads_real_gpus_or_explains_what_is_missing():
    try:
        probe = NvmlProbe(needed_by="m 127.0.0.1:8000")
    except GpuProbeError as exc:  # no driver here: one paragraph, naming the ways out
        text = str(exc)
        assert "\n" not in text
        assert "NVML" in text and "--fake-gpus" in text and "device: cpu" in text and "m 127.0.0.1:8000" in text
        return
    try:  # a GPU host: every GPU has sane numbers
        gpus = probe.read()
        assert gpus and all(0 <= g.free_gb <= g.total_gb for g in gpus.values())
        assert not probe.simulated
    finally:
        probe.close()

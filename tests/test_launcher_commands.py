"""What the launcher would run: `--dry-run` through the real CLI, and the pure planning functions."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, free_port, http_json, run_cli, wait_http_ok, write_fleet
from modelfleet.launcher.commands import SGLANG_KEY_SHIM, backend_flags, cpu_list
from modelfleet.launcher.gpus import GpuState
from modelfleet.launcher.hosts import LocalServer, bind_host_for, local_names
from modelfleet.launcher.memory import MemoryPlanError, plan_memory, start_groups

from modelfleet.config import ModelSpec, ServerSpec
from modelfleet.errors import UsageError

API_KEY = "sk-dry-run-secret-91c2"


def serve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "serve_pipeline.py"), *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd or ROOT)


def parse_dry_run(out: str) -> dict[str, dict]:
    """Blocks of `LABEL` followed by `  argv:`, `  env:`, `  memory:` lines."""
    servers: dict[str, dict] = {}
    current: dict = {}
    lines = out.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if following.startswith("  argv: "):
            current = servers[line] = {}
        elif line.startswith("  argv: "):
            current["argv"] = shlex.split(line[len("  argv: "):])
        elif line.startswith("  env: "):
            text = line[len("  env: "):]
            current["env"] = {} if text == "(nothing added)" else dict(
                item.split("=", 1) for item in shlex.split(text))
        elif line.startswith("  memory: "):
            current["memory"] = line[len("  memory: "):]
    return servers


def flag(argv: list[str], name: str) -> str | None:
    """The value after `name`, or None when the flag is absent."""
    return argv[argv.index(name) + 1] if name in argv else None


def gpus_file(tmp_path: Path, *totals: float) -> Path:
    lines = [f"  - {{index: {i}, name: H100, total_gb: {t}, free_gb: {t}}}" for i, t in enumerate(totals)]
    path = tmp_path / "gpus.yaml"
    path.write_text("gpus:\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def gpu_fleet(tmp_path: Path) -> Path:
    return write_fleet(tmp_path / "fleet.yaml", {
        "llama": {
            "backend": "vllm", "model_path": "meta-llama/Llama-3.1-8B-Instruct", "api_key": API_KEY,
            "backend_args": {"enable-prefix-caching": True, "enforce-eager": False,
                             "override-generation-config": {"temperature": 0.5},
                             "max-model-len": 8192},
            "servers": [{"host": "127.0.0.1", "port": 8101, "gpus": [0]},
                        {"host": "127.0.0.1", "port": 8102, "gpus": [0]}],
        },
        "qwen": {
            "backend": "sglang", "model_path": "Qwen/Qwen2.5-72B-Instruct", "served_name": "qwen-72b",
            "api_key": API_KEY,
            "backend_args": {"enable-torch-compile": True, "disable-radix-cache": False,
                             "json-model-override-args": {"rope_scaling": {"factor": 2}}},
            "servers": [{"host": "127.0.0.1", "port": 8103, "gpus": [1, 2], "min_free_memory_gb": 60}],
        },
    })


def test_dry_run_vllm_and_sglang_flags_env_memory_and_start_order(tmp_path, gpu_fleet):
    result = serve("-c", str(gpu_fleet), "--fake-gpus", str(gpus_file(tmp_path, 80, 80, 80)), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert API_KEY not in result.stdout + result.stderr
    servers = parse_dry_run(result.stdout)
    assert set(servers) == {"llama 127.0.0.1:8101", "llama 127.0.0.1:8102", "qwen 127.0.0.1:8103"}

    for port in (8101, 8102):
        s = servers[f"llama 127.0.0.1:{port}"]
        argv = s["argv"]
        assert Path(argv[0]).name == "vllm" and argv[1:3] == ["serve", "meta-llama/Llama-3.1-8B-Instruct"]
        assert flag(argv, "--port") == str(port) and flag(argv, "--host") == "127.0.0.1"
        assert flag(argv, "--served-model-name") == "llama"
        assert flag(argv, "--gpu-memory-utilization") == "0.45"  # two replicas split vLLM's 0.9
        assert flag(argv, "--tensor-parallel-size") == "1"
        assert "--enable-prefix-caching" in argv and flag(argv, "--enable-prefix-caching") == "--override-generation-config"
        assert "--enforce-eager" not in argv  # false -> omitted
        assert flag(argv, "--override-generation-config") == '{"temperature": 0.5}'
        assert flag(argv, "--max-model-len") == "8192"
        assert "--api-key" not in argv
        assert s["env"] == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0", "VLLM_API_KEY": "***"}
        assert "fraction 0.45" in s["memory"] and "36.0 GB free on GPU 0" in s["memory"]
        assert "simulated" in s["memory"]

    s = servers["qwen 127.0.0.1:8103"]
    argv = s["argv"]
    start = argv.index("sglang.launch_server")
    assert argv[start + 1:start + 3] == ["--model-path", "Qwen/Qwen2.5-72B-Instruct"]
    assert flag(argv, "--served-model-name") == "qwen-72b"
    assert flag(argv, "--mem-fraction-static") == "0.75"  # 60 GB of 80
    assert flag(argv, "--tp-size") == "2"
    assert "--enable-metrics" in argv and "--enable-torch-compile" in argv
    assert "--disable-radix-cache" not in argv
    assert flag(argv, "--json-model-override-args") == '{"rope_scaling": {"factor": 2}}'
    assert s["env"] == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1,2",
                        "MODELFLEET_API_KEY": "***"}

    assert "one at a time (shared GPU 0): llama 127.0.0.1:8101, llama 127.0.0.1:8102" in result.stdout
    assert "concurrently: qwen 127.0.0.1:8103" in result.stdout


def test_modelfleet_serve_is_the_same_command(tmp_path, gpu_fleet):
    fake = str(gpus_file(tmp_path, 80, 80, 80))
    direct = serve("-c", str(gpu_fleet), "--fake-gpus", fake, "--dry-run")
    via_cli = run_cli("serve", "-c", str(gpu_fleet), "--fake-gpus", fake, "--dry-run")
    assert via_cli.returncode == 0, via_cli.stderr
    assert via_cli.stdout == direct.stdout


def test_dry_run_python_command_cpus_and_device_cpu(tmp_path):
    config = write_fleet(tmp_path / "fleet.yaml", {
        "tiny": {
            "backend": "vllm", "device": "cpu", "python": "/opt/vllm-cpu/bin/python",
            "model_path": "/models/tiny", "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "backend_args": {"dtype": "float32"},
            "servers": [{"host": "127.0.0.1", "port": 8201, "cpus": [0]},
                        {"host": "127.0.0.1", "port": 8202, "cpus": [1, 2, 3, 5]}],
        },
        "custom": {
            "backend": "vllm", "device": "cpu",
            "command": ["/opt/bin/serve-it", "--port", "{port}", "--model", "{model_path}", "--x", '{"a": 1}'],
            "servers": [{"host": "127.0.0.1", "port": 8203}],
        },
    })
    result = serve("-c", str(config), "--dry-run")  # no --fake-gpus: device cpu never needs NVML
    assert result.returncode == 0, result.stderr
    servers = parse_dry_run(result.stdout)
    for port, cpus in ((8201, "0"), (8202, "1-3,5")):
        s = servers[f"tiny 127.0.0.1:{port}"]
        assert s["argv"][:5] == ["/opt/vllm-cpu/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                                 "--model", "/models/tiny"]
        assert "--gpu-memory-utilization" not in s["argv"] and "--tensor-parallel-size" not in s["argv"]
        assert s["env"] == {"VLLM_CPU_OMP_THREADS_BIND": cpus, "VLLM_CPU_KVCACHE_SPACE": "1"}
        assert s["memory"] == "device cpu: no GPU memory"
    assert servers["custom 127.0.0.1:8203"]["argv"] == [
        "/opt/bin/serve-it", "--port", "8203", "--model", "custom", "--x", '{"a": 1}']
    assert servers["custom 127.0.0.1:8203"]["env"] == {}


def nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(nvml_works(), reason="this machine has NVML; the no-NVML message cannot show")
def test_gpu_model_without_nvml_or_fake_gpus_is_one_paragraph_exit_2(gpu_fleet):
    for command in (serve, lambda *a: run_cli("serve", *a)):
        result = command("-c", str(gpu_fleet), "--dry-run")
        assert result.returncode == 2
        assert result.stdout == ""
        err = result.stderr.strip()
        assert "Traceback" not in err and "\n\n" not in err
        assert "NVML" in err and "NVIDIA driver" in err and "--fake-gpus" in err and "device: cpu" in err
        assert "llama 127.0.0.1:8101" in err  # who needs it


def test_sim_servers_with_gpus_never_touch_nvml(tmp_path):
    config = write_fleet(tmp_path / "fleet.yaml", {
        "s": {"backend": "sim", "servers": [{"host": "127.0.0.1", "port": 8301, "gpus": [0]}]}})
    result = serve("-c", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    s = parse_dry_run(result.stdout)["s 127.0.0.1:8301"]
    assert s["argv"][1:4] == ["-m", "modelfleet", "sim"] and "CUDA_VISIBLE_DEVICES" not in s["env"]


@pytest.mark.parametrize(("models", "flags", "expected"), [
    ({"m": {"backend": "sim", "servers": [{"host": "127.0.0.1", "port": 8401}]}},
     ["--only", "nope"], "unknown model 'nope'; known models: m"),
    ({"m": {"backend": "sim", "servers": [{"host": "10.250.1.2", "port": 8401}]}},
     [], "no server of the fleet file belongs to this machine"),
    ({"m": {"backend": "vllm", "servers": [{"host": "127.0.0.1", "port": 8401, "gpus": [0],
                                            "min_free_memory_gb": 90}]}},
     ["--fake-gpus", "GPUS"], "min_free_memory_gb is 90 but GPU 0 (H100) has 80.0 GB"),
    ({"m": {"backend": "vllm", "servers": [
        {"host": "127.0.0.1", "port": 8401, "gpus": [0], "min_free_memory_gb": 50},
        {"host": "127.0.0.1", "port": 8402, "gpus": [0], "min_free_memory_gb": 50}]}},
     ["--fake-gpus", "GPUS"], "cannot fit: m 127.0.0.1:8401 needs 50.0 GB, m 127.0.0.1:8402 needs 50.0 GB"),
    ({"m": {"backend": "vllm", "servers": [{"host": "127.0.0.1", "port": 8401, "gpus": [3]}]}},
     ["--fake-gpus", "GPUS"], "GPU 3 does not exist here"),
    ({"m": {"backend": "vllm", "backend_args": {"port": 9000},
            "servers": [{"host": "127.0.0.1", "port": 8401, "gpus": [0]}]}},
     ["--fake-gpus", "GPUS"], "models.m.backend_args.port: the launcher sets --port"),
    ({"m": {"backend": "sim", "servers": [
        {"host": "127.0.0.1", "port": 8401}, {"host": "localhost", "port": 8401}]}},
     [], "both use port 8401 on this machine"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path, models, flags, expected):
    config = write_fleet(tmp_path / "fleet.yaml", models)
    fake = str(gpus_file(tmp_path, 80))
    result = serve("-c", str(config), "--dry-run", *[fake if f == "GPUS" else f for f in flags])
    assert result.returncode == 2, result.stdout
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_bad_described_gpu_file_names_the_entry(tmp_path):
    config = write_fleet(tmp_path / "fleet.yaml", {
        "m": {"backend": "sim", "servers": [{"host": "127.0.0.1", "port": 8401}]}})
    fake = tmp_path / "gpus.yaml"
    fake.write_text("gpus:\n  - {index: 0, name: H100, total_gb: 80, free_gb: 95}\n")
    result = serve("-c", str(config), "--dry-run", "--fake-gpus", str(fake))
    assert result.returncode == 2
    assert "gpus[0].free_gb: must be a number from 0 to total_gb (80), got 95" in result.stderr


def test_config_error_exits_2_with_the_parser_message(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  m:\n    backend: sim\n    servers: [{host: 127.0.0.1, port: 70000}]\n")
    result = serve("-c", str(path), "--dry-run")
    assert result.returncode == 2
    assert "fleet.yaml:4" in result.stderr and "port" in result.stderr and "Traceback" not in result.stderr


# -- the pure pieces ------------------------------------------------------------------------


def local(name: str, backend: str, port: int, gpus: tuple[int, ...] = (), *,
          min_free: float | None = None, backend_args: dict | None = None) -> LocalServer:
    server = ServerSpec(host="127.0.0.1", port=port, gpus=gpus, min_free_memory_gb=min_free)
    model = ModelSpec(name=name, servers=(server,), backend=backend, backend_args=backend_args or {})
    return LocalServer(model=model, server=server, bind_host="127.0.0.1")


H100 = {i: GpuState(index=i, name="H100", total_gb=80.0, free_gb=80.0) for i in range(4)}


def test_backend_args_follow_the_engines_argparse_conventions():
    assert backend_flags({"a": 1, "b": True, "c": False, "d": ["x", 2], "e": {"k": [1]},
                          "f": 0.5, "g": 4096.0, "h": []}, "m") == [
        "--a", "1", "--b", "--d", "x", "2", "--e", '{"k": [1]}', "--f", "0.5", "--g", "4096"]
    with pytest.raises(UsageError, match="api_key"):
        backend_flags({"api-key": "x"}, "m")


def test_cpu_list_compresses_runs():
    assert cpu_list([0]) == "0"
    assert cpu_list([1, 0]) == "0-1"
    assert cpu_list([0, 2]) == "0,2"
    assert cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


def test_memory_plan_splits_shared_gpus_after_explicit_claims():
    servers = [local("a", "vllm", 1, (0,)), local("b", "vllm", 2, (0,)), local("c", "vllm", 3, (0,), min_free=18),
               local("d", "sglang", 4, (1, 2)), local("e", "vllm", 5, (3,), backend_args={"gpu_memory_utilization": 0.5}),
               local("f", "sim", 6, (3,))]
    plan = plan_memory(servers, H100)
    assert plan[servers[0].key].fraction == plan[servers[1].key].fraction == 0.337  # (72 - 18) / 2 / 80
    assert plan[servers[2].key].fraction == 0.225 and plan[servers[2].key].need_gb == ((0, 18.0),)
    assert plan[servers[3].key].fraction == 0.85
    assert plan[servers[3].key].need_gb == ((1, 68.0), (2, 68.0))
    assert plan[servers[4].key].fraction == 0.5 and plan[servers[4].key].need_gb == ((3, 40.0),)
    assert plan[servers[5].key].fraction is None and plan[servers[5].key].need_gb == ()
    assert plan_memory(servers, None)[servers[0].key].need_gb == ()  # nothing probed: nobody waits
    with pytest.raises(MemoryPlanError, match="cannot fit"):
        plan_memory([local("a", "vllm", 1, (0,), min_free=60), local("b", "vllm", 2, (0,), min_free=30)], H100)


def test_start_groups_join_servers_that_share_any_gpu():
    a, b, c, d, e = (local("a", "vllm", 1, (0,)), local("b", "vllm", 2, (1,)), local("c", "vllm", 3, (0, 1)),
                     local("d", "vllm", 4, (2,)), local("e", "vllm", 5))
    groups = start_groups([a, b, c, d, e])
    assert [[s.model.name for s in g] for g in groups] == [["a", "b", "c"], ["d"], ["e"]]


def test_bind_host_and_local_names():
    names = local_names()
    assert {"127.0.0.1", "::1", "localhost"} <= names
    assert bind_host_for("127.0.0.1", names) == "127.0.0.1"
    assert bind_host_for("localhost", names) == "127.0.0.1"
    assert bind_host_for("gpu-host-3.example", names) == "0.0.0.0"  # a name: every interface
    assert bind_host_for("203.0.113.9", names) == "0.0.0.0"  # --host behind NAT


def test_sglang_key_shim_hands_the_key_to_the_engine_without_showing_it_in_ps():
    # The shim works for any `python -m` module; the sim stands in for sglang.launch_server here.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SGLANG_KEY_SHIM, "modelfleet", "sim", "--port", str(port), "--model", "m",
         "--speed", "1000"],
        env={**os.environ, "MODELFLEET_API_KEY": API_KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc=proc)
        assert API_KEY not in " ".join(psutil.Process(proc.pid).cmdline())
        assert http_json(f"http://127.0.0.1:{port}/v1/models")[0] == 401
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                         headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("argv", [
    [sys.executable, "serve_pipeline.py", "--dry-run"],
    [sys.executable, "-m", "modelfleet", "config", "show"],
])
def test_a_reader_that_leaves_early_gets_no_traceback(argv: list[str]) -> None:
    """`... | head -1`: the command ends quietly when its reader goes away (here: before
    the first line, so the very first write meets a closed pipe)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(argv, cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141

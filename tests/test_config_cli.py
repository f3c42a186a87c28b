"""`modelfleet config validate / show / get` as a user runs them: a subprocess, exit codes, stderr."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

SECRET = "sk-live-0123456789abcdef"

VALID = """\
routing:
  policy: peak_ewma
models:
  m1:
    kind: chat
    servers:
      - {host: 127.0.0.1, port: 8001}
      - {host: 127.0.0.1, port: 8002}
  e1:
    kind: embedding
    servers:
      - {host: 127.0.0.1, port: 8003}
"""

# (case id, fleet file text, line, key path, words the message must hold)
BAD_CONFIGS = [
    ("port-out-of-range", VALID.replace("8002", "70000"), 8, "models.m1.servers[1].port",
     "must be 1..65535, got 70000"),
    ("port-is-bool", VALID.replace("8002", "true"), 8, "models.m1.servers[1].port",
     "must be an integer, got true"),
    ("port-is-quoted", VALID.replace("8002", '"8002"'), 8, "models.m1.servers[1].port",
     "remove the quotes"),
    ("unknown-top-key", VALID.replace("routing:", "routin:"), 1, "routin",
     "did you mean 'routing'"),
    ("unknown-server-key", VALID.replace("port: 8003", "prot: 8003"), 12, "models.e1.servers[0].prot",
     "did you mean 'port'"),
    ("unknown-policy", VALID.replace("peak_ewma", "teleport"), 2, "routing.policy",
     "must be one of peak_ewma, fastest, least_loaded, round_robin, random"),
    ("unknown-kind", VALID.replace("kind: embedding", "kind: embeddings"), 10, "models.e1.kind",
     "did you mean 'embedding'"),
    ("unknown-backend", VALID.replace("    kind: chat", "    kind: chat\n    backend: tensorrt"), 6,
     "models.m1.backend", "must be one of vllm, sglang, sim"),
    ("duplicate-server", VALID.replace("8003", "8001"), 12, "models.e1.servers[0]",
     "127.0.0.1:8001 is already used by models.m1.servers[0] (line 7)"),
    ("no-servers", VALID.replace("    servers:\n      - {host: 127.0.0.1, port: 8003}", "    servers: []"),
     11, "models.e1.servers", "lists no servers"),
    ("missing-servers", VALID.replace("    servers:\n      - {host: 127.0.0.1, port: 8003}", ""),
     9, "models.e1", "missing required key 'servers'"),
    ("missing-port", VALID.replace(", port: 8003", ""), 12, "models.e1.servers[0]",
     "missing required key 'port'"),
    ("alias-is-a-model-name", VALID.replace("    kind: embedding", "    kind: embedding\n    aliases: [m1]"),
     11, "models.e1.aliases[0]", "alias 'm1' is also the name of a model"),
    ("alias-of-two-models", VALID.replace("    kind: chat", "    kind: chat\n    aliases: [small]")
     .replace("    kind: embedding", "    kind: embedding\n    aliases: [small]"),
     12, "models.e1.aliases[0]", "also an alias of model 'm1'"),
    ("retry-below-one", VALID.replace("  policy: peak_ewma", "  policy: peak_ewma\n  max_retry: 0"), 3,
     "routing.max_retry", "must be at least 1, got 0"),
    ("rate-not-above-one", VALID.replace("  policy: peak_ewma", "  policy: peak_ewma\n  latency_growing_rate: 1"),
     3, "routing.latency_growing_rate", "must be greater than 1, got 1"),
    ("stall-over-request-timeout",
     VALID.replace("  policy: peak_ewma", "  policy: peak_ewma\n  request_timeout_s: 3\n  stall_timeout_s: 10"),
     4, "routing.stall_timeout_s", "must not exceed request_timeout_s (3)"),
    ("timeout-is-text", VALID.replace("  policy: peak_ewma", "  policy: peak_ewma\n  request_timeout_s: soon"),
     3, "routing.request_timeout_s", "must be a number, got 'soon'"),
    ("gpu-twice", VALID.replace("port: 8001}", "port: 8001, gpus: [0, 0]}"), 7,
     "models.m1.servers[0].gpus[1]", "GPU 0 is listed twice"),
    ("gpu-negative", VALID.replace("port: 8001}", "port: 8001, gpus: [-1]}"), 7,
     "models.m1.servers[0].gpus[0]", "must be at least 0, got -1"),
    ("min-free-memory-zero", VALID.replace("port: 8001}", "port: 8001, min_free_memory_gb: 0}"), 7,
     "models.m1.servers[0].min_free_memory_gb", "must be greater than 0"),
    ("sim-speed-negative", VALID.replace("port: 8003}", "port: 8003, sim: {speed: -2}}"), 12,
     "models.e1.servers[0].sim.speed", "must be greater than 0, got -2"),
    ("unknown-device", VALID.replace("    kind: chat", "    kind: chat\n    device: tpu"), 6,
     "models.m1.device", "must be one of gpu, cpu"),
    ("backend-arg-with-dashes", VALID.replace("    kind: chat", "    kind: chat\n    backend_args: {--max-model-len: 4}"),
     6, "models.m1.backend_args.--max-model-len", "write the flag without dashes"),
    ("host-with-scheme", VALID.replace("host: 127.0.0.1, port: 8003", "host: http://10.0.0.1, port: 8003"),
     12, "models.e1.servers[0].host", "write the host name or address only"),
    ("models-not-a-mapping", "models: [m1, e1]\n", 1, "models", "must be a mapping of model name"),
    ("no-models", "models: {}\n", 1, "models", "lists no models"),
    ("benchmark-max-tokens", VALID + "benchmark:\n  max_tokens: 0\n", 14, "benchmark.max_tokens",
     "must be at least 1"),
    ("unset-variable", VALID.replace("    kind: chat", "    kind: chat\n    api_key: ${MF_CLI_TEST_UNSET}"), 6,
     "models.m1.api_key", "environment variable MF_CLI_TEST_UNSET is not set"),
]


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_valid_sample_validates(tmp_path: Path) -> None:
    result = run_cli("config", "validate", "-c", str(write(tmp_path, VALID)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 2 models, 3 servers")


@pytest.mark.parametrize(("text", "line", "path", "words"), [case[1:] for case in BAD_CONFIGS],
                         ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_exits_2_naming_file_line_and_key(tmp_path: Path, text: str, line: int, path: str,
                                                     words: str) -> None:
    result = run_cli("config", "validate", "-c", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stdout
    assert f"fleet.yaml:{line}: {path}: " in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("text", "line", "words"), [
    ("models:\n  m1: {servers: [\n", 3, "YAML syntax error"),
    ("- just\n- a list\n", 1, "the top level must be a mapping"),
    ("models:\n  m1: {}\n  m1: {}\n", 3, "key 'm1' appears twice"),
    ("# only a comment\n", None, "the file is empty"),
    ("models:\n  m1:\n    env: {A: ${X}}\n", 3, 'quote values that hold ${VAR}: "${VAR}"'),
])
def test_unparseable_files_exit_2_with_a_line(tmp_path: Path, text: str, line: int | None, words: str) -> None:
    result = run_cli("config", "validate", "-c", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert (f"fleet.yaml:{line}: " if line else "fleet.yaml: ") in result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = (VALID.replace("peak_ewma", "teleport").replace("8002", "70000")
            .replace("kind: embedding", "kind: embeddings").replace("8003", "8001"))
    result = run_cli("config", "validate", "-c", str(write(tmp_path, text)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{tmp_path / 'fleet.yaml'}:2", "routing.policy"],
        [f"{tmp_path / 'fleet.yaml'}:8", "models.m1.servers[1].port"],
        [f"{tmp_path / 'fleet.yaml'}:10", "models.e1.kind"],
        [f"{tmp_path / 'fleet.yaml'}:12", "models.e1.servers[0]"],
    ]


def test_config_flag_before_or_after_the_subcommand(tmp_path: Path) -> None:
    path = str(write(tmp_path, VALID))
    for argv in (["-c", path, "config", "validate"], ["config", "-c", path, "validate"],
                 ["config", "validate", "-c", path], ["config", "validate", "--config", path],
                 ["config", "get", "-c", path, "routing.policy"], ["config", "get", "routing.policy", "-c", path]):
        result = run_cli(*argv, cwd=tmp_path, env={"MODELFLEET_CONFIG": ""})
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stdout.startswith(("ok: 2 models", "peak_ewma")), argv


def test_file_from_environment_then_current_directory(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    from_env = write(other, VALID, "fleet.yaml")
    result = run_cli("config", "validate", cwd=tmp_path, env={"MODELFLEET_CONFIG": str(from_env)})
    assert result.returncode == 0 and str(from_env) in result.stdout

    missing = run_cli("config", "validate", cwd=tmp_path, env={"MODELFLEET_CONFIG": ""})
    assert missing.returncode == 2
    assert "client_config.yaml: fleet file does not exist" in missing.stderr
    assert "-c FILE" in missing.stderr and "$MODELFLEET_CONFIG" in missing.stderr

    write(tmp_path, VALID.replace("8003", "8004"), "client_config.yaml")
    local = run_cli("config", "validate", cwd=tmp_path, env={"MODELFLEET_CONFIG": ""})
    assert local.returncode == 0 and "client_config.yaml" in local.stdout

    wrong = run_cli("config", "validate", "-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert wrong.returncode == 2 and "nope.yaml: fleet file does not exist (given with -c)" in wrong.stderr


def test_default_fleet_file_validates_and_shows() -> None:
    result = run_cli("config", "validate", "-c", str(ROOT / "client_config.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 2 models, 5 servers")
    shown = run_cli("config", "show", "-c", str(ROOT / "client_config.yaml"))
    assert shown.returncode == 0, shown.stderr
    assert "policy: peak_ewma" in shown.stdout and "probe_interval_s: 2" in shown.stdout
    assert "retry_budget_ratio: 0.2" in shown.stdout  # defaults are filled in


def test_show_resolves_variables_and_masks_secrets(tmp_path: Path) -> None:
    text = VALID.replace("    kind: chat", "    kind: chat\n    api_key: ${MF_CLI_TEST_KEY}\n"
                         "    model_path: ${MF_CLI_TEST_PATH:-org/default}\n"
                         "    env: {HF_TOKEN: \"${MF_CLI_TEST_KEY}\", HF_HOME: /data}")
    path = str(write(tmp_path, text))
    result = run_cli("config", "show", "-c", path, env={"MF_CLI_TEST_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "api_key: '***'" in result.stdout and "HF_TOKEN: '***'" in result.stdout
    assert "model_path: org/default" in result.stdout and "HF_HOME: /data" in result.stdout
    got = run_cli("config", "get", "models.m1.api_key", "-c", path, env={"MF_CLI_TEST_KEY": SECRET})
    assert got.stdout.strip() == "${MF_CLI_TEST_KEY}"  # where it comes from is no secret

    empty = run_cli("config", "show", "-c", path, env={"MF_CLI_TEST_KEY": ""})
    assert empty.returncode == 0, empty.stderr  # set but empty: no key (`${KEY:-}` makes it optional)
    assert "api_key" not in empty.stdout
    literal = write(tmp_path, text.replace("${MF_CLI_TEST_KEY}", SECRET), "literal.yaml")
    for argv in (("show",), ("get", "models.m1.api_key"), ("get", "models.m1"), ("validate",)):
        result = run_cli("config", *argv, "-c", str(literal))
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr, argv
    bad = write(tmp_path, text.replace("${MF_CLI_TEST_KEY}", f"[{SECRET}]", 1), "bad.yaml")
    result = run_cli("config", "validate", "-c", str(bad))
    assert result.returncode == 2 and "models.m1.api_key: must be a string, got ***" in result.stderr
    assert SECRET not in result.stderr


def test_show_refuses_an_unset_variable(tmp_path: Path) -> None:
    text = VALID.replace("    kind: chat", "    kind: chat\n    api_key: ${MF_CLI_TEST_UNSET}")
    result = run_cli("config", "show", "-c", str(write(tmp_path, textwrap.dedent(text))))
    assert result.returncode == 2
    assert "fleet.yaml:6: models.m1.api_key: environment variable MF_CLI_TEST_UNSET is not set" in result.stderr


def test_get_prints_values_and_defaults(tmp_path: Path) -> None:
    path = str(write(tmp_path, VALID))
    assert run_cli("config", "get", "models.m1.servers[1].port", "-c", path).stdout == "8002\n"
    assert run_cli("config", "get", "routing.max_retry", "-c", path).stdout == "5\n"  # the default
    assert run_cli("config", "get", "models.e1.served_name", "-c", path).stdout == "e1\n"
    servers = run_cli("config", "get", "models.m1.servers[0]", "-c", path).stdout
    assert servers == "host: 127.0.0.1\nport: 8001\n"
    missing = run_cli("config", "get", "routing.nope", "-c", path)
    assert missing.returncode == 2 and "routing.nope: not in" in missing.stderr
    assert "Traceback" not in missing.stderr

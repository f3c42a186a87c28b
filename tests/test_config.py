"""The fleet-file loader, in process: defaults, strictness, `${VAR}`s, secrets, and no crash ever."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from modelfleet.config import (
    ConfigDocument,
    FleetConfig,
    RoutingSpec,
    SimSpec,
    fleet_to_dict,
    load_config,
    parse_config,
    parse_key_path,
)
from modelfleet.errors import ConfigError, UnknownModel

SECRET = "sk-live-0123456789abcdef"


def problems(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "fleet.yaml", **kwargs)
    return [str(p) for p in info.value.problems]


def test_minimal_file_gets_every_default() -> None:
    cfg = parse_config("models:\n  m:\n    servers: [{host: h, port: 1}]\n", "f.yaml")
    assert cfg.routing == RoutingSpec()
    assert cfg.routing.stall_timeout_s == 5
    model = cfg.models["m"]
    assert (model.kind, model.backend, model.device) == ("chat", "vllm", "gpu")
    assert model.served_name == model.wire_name == "m"
    assert model.model_path == "m"
    assert model.servers[0].url == "http://h:1"
    assert model.servers[0].line == 3


def test_default_fleet_file_is_the_documented_demo_fleet() -> None:
    cfg = load_config(ROOT / "client_config.yaml")
    assert cfg.routing.policy == "peak_ewma" and cfg.routing.probe_interval_s == 2
    chat, embed = cfg.models["llama-8b"], cfg.models["minilm"]
    assert chat.aliases == ("8B",) and chat.backend == "sim" and chat.sim.speed == 20
    assert [s.address for s in chat.servers] == ["127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103"]
    speeds = [chat.sim_for(s).speed for s in chat.servers]
    assert speeds == [20, 20, 5]
    assert chat.sim_for(chat.servers[2]).dim == chat.sim.dim  # per-server sim merges over the model's
    assert embed.kind == "embedding" and embed.sim.dim == 384
    assert [s.port for s in embed.servers] == [8201, 8202]
    assert cfg.resolve_model("8B") is chat
    with pytest.raises(UnknownModel, match="llama-8b, minilm"):
        cfg.resolve_model("70B")


def test_every_model_and_server_key_is_read() -> None:
    cfg = parse_config(textwrap.dedent("""\
        models:
          big:
            kind: chat
            aliases: [B, "Big"]
            model_path: org/big
            served_name: big-v2
            backend: sglang
            backend_args: {max-model-len: 4096, enforce-eager: true, json-arg: {a: [1, 2]}}
            env: {OMP_NUM_THREADS: 4, HF_HOME: /data}
            python: /opt/venv/bin/python
            device: cpu
            servers:
              - {host: 10.0.0.3, port: 8080, cpus: [0, 1], min_free_memory_gb: 2.5}
          raw:
            command: [my-engine, --port, "9000"]
            sim: {speed: 2, batch_slowdown: 0.1, dim: 8, max_batch: 4, seed: 7}
            servers:
              - {host: 10.0.0.3, port: 9000, gpus: [3, 1], sim: {speed: 9}}
        """), "f.yaml")
    big, raw = cfg.models["big"], cfg.models["raw"]
    assert big.wire_name == "big-v2" and big.model_path == "org/big" and big.backend == "sglang"
    assert dict(big.backend_args) == {"max-model-len": 4096, "enforce-eager": True, "json-arg": {"a": [1, 2]}}
    assert dict(big.env) == {"OMP_NUM_THREADS": "4", "HF_HOME": "/data"}
    assert big.python == "/opt/venv/bin/python" and big.device == "cpu"
    assert big.servers[0].cpus == (0, 1) and big.servers[0].min_free_memory_gb == 2.5
    assert raw.command == ("my-engine", "--port", "9000")
    assert raw.servers[0].gpus == (3, 1)
    assert raw.sim_for(raw.servers[0]) == SimSpec(speed=9, batch_slowdown=0.1, dim=8, max_batch=4, seed=7)


def test_all_problems_of_a_file_are_reported_at_once_in_line_order() -> None:
    found = problems("""\
        routing:
          policy: fastest
          max_retry: 0
        models:
          m1:
            kind: chatt
            servers:
              - {host: a, port: 1}
              - {host: a, port: 70000}
          m2:
            servers: [{host: a, port: 1}]
        """)
    assert found == [
        "fleet.yaml:3: routing.max_retry: must be at least 1, got 0",
        "fleet.yaml:6: models.m1.kind: must be one of chat, embedding; got 'chatt' (did you mean 'chat'?)",
        "fleet.yaml:9: models.m1.servers[1].port: must be 1..65535, got 70000",
        "fleet.yaml:11: models.m2.servers[0]: a:1 is already used by models.m1.servers[0] (line 8); "
        "each server needs its own host:port",
    ]


@pytest.mark.parametrize(("value", "message"), [
    ("true", "must be an integer, got true"),  # YAML's true is no port, though Python's bool is an int
    ("8080.5", "must be an integer, got 8080.5"),
    ('"8080"', "must be an integer, got '8080' (a string; remove the quotes)"),
    ("[8080]", "must be an integer, got a list"),
    ("0", "must be 1..65535, got 0"),
    ("", "must be an integer, got nothing (null)"),
])
def test_port_must_be_a_real_integer_in_range(value: str, message: str) -> None:
    found = problems(f"models:\n  m:\n    servers:\n      - host: h\n        port: {value}\n")
    assert found == [f"fleet.yaml:5: models.m.servers[0].port: {message}"]


def test_unknown_keys_suggest_the_closest_known_key() -> None:
    found = problems("""\
        routng: {}
        models:
          m:
            severs: []
            servers: [{host: h, port: 1, gpu: [0]}]
        """)
    assert found == [
        "fleet.yaml:1: routng: unknown key; did you mean 'routing'?",
        "fleet.yaml:4: models.m.severs: unknown key; did you mean 'servers'?",
        "fleet.yaml:5: models.m.servers[0].gpu: unknown key; did you mean 'gpus'?",
    ]


def test_structural_errors_name_their_line() -> None:
    assert problems("") == ["fleet.yaml: the file is empty; it needs at least a `models:` section"]
    assert problems("- a\n- b\n")[0].startswith("fleet.yaml:1: the top level must be a mapping")
    assert problems("routing: {}\n")[0].startswith("fleet.yaml:1: models: missing")
    assert problems("models:\n  m:\n    servers: [\n")[0].startswith("fleet.yaml:4: YAML syntax error")
    assert problems("models:\n  m: {}\n  m: {}\n") == [
        "fleet.yaml:3: key 'm' appears twice in one mapping; keep one"]


def test_env_substitution_set_default_and_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    text = textwrap.dedent("""\
        models:
          m:
            model_path: ${MF_TEST_PATH}
            served_name: ${MF_TEST_UNSET_NAME:-fallback}
            api_key: ${MF_TEST_KEY}
            servers:
              - {host: "${MF_TEST_HOST:-127.0.0.1}", port: "${MF_TEST_PORT:-8080}"}
        """)
    monkeypatch.setenv("MF_TEST_PATH", "org/model")
    monkeypatch.setenv("MF_TEST_KEY", SECRET)
    monkeypatch.setenv("MF_TEST_PORT", "9001")
    monkeypatch.delenv("MF_TEST_HOST", raising=False)
    monkeypatch.delenv("MF_TEST_UNSET_NAME", raising=False)
    model = parse_config(text, "f.yaml").models["m"]
    assert model.model_path == "org/model" and model.served_name == "fallback"
    assert model.api_key == SECRET
    assert model.servers[0].address == "127.0.0.1:9001"  # a substituted number becomes a number

    monkeypatch.delenv("MF_TEST_KEY")
    monkeypatch.setenv("MF_TEST_PORT", "ninety")
    found = problems(text)
    assert found == [
        "fleet.yaml:5: models.m.api_key: environment variable MF_TEST_KEY is not set; "
        "set it, or give a default as ${MF_TEST_KEY:-default}",
        "fleet.yaml:7: models.m.servers[0].port: must be an integer, got 'ninety' after ${VAR} substitution",
    ]
    # Structure only: variables stay as written and need not be set.
    monkeypatch.delenv("MF_TEST_PATH")
    model = parse_config(text, "f.yaml", resolve_env=False).models["m"]
    assert model.model_path == "${MF_TEST_PATH}"
    assert model.api_key == "${MF_TEST_KEY}"


def test_malformed_references_and_escapes() -> None:
    found = problems("models:\n  m:\n    model_path: ${1BAD}\n    servers: [{host: h, port: 1}]\n")
    assert found[0].startswith("fleet.yaml:3: models.m.model_path: malformed variable reference ${1BAD}")
    cfg = parse_config("models:\n  m:\n    model_path: a$${b}\n    servers: [{host: h, port: 1}]\n", "f")
    assert cfg.models["m"].model_path == "a${b}"


def test_secrets_never_appear_in_messages_or_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    base = "models:\n  m:\n    api_key: {}\n    servers: [{{host: h, port: 1}}]\n"
    cfg = parse_config(base.format(SECRET), "f.yaml")
    assert cfg.models["m"].api_key == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.models["m"])
    assert SECRET not in str(fleet_to_dict(cfg))
    assert fleet_to_dict(cfg)["models"]["m"]["api_key"] == "***"
    for bad in ("1234567890123", f"[{SECRET}]", f"'{SECRET}'\n    api_key: other"):
        with pytest.raises(ConfigError) as info:
            parse_config(base.format(bad), "f.yaml")
        message = str(info.value)
        assert "api_key" in message
        assert "1234567890123" not in message and SECRET not in message


def test_find_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfleet.config import find_config_path

    explicit, from_env, local = (tmp_path / n for n in ("a.yaml", "b.yaml", "client_config.yaml"))
    for path in (explicit, from_env, local):
        path.write_text("models: {m: {servers: [{host: h, port: 1}]}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELFLEET_CONFIG", str(from_env))
    assert find_config_path(explicit) == explicit
    assert find_config_path(None) == from_env
    monkeypatch.delenv("MODELFLEET_CONFIG")
    assert find_config_path(None).resolve() == local
    local.unlink()
    with pytest.raises(ConfigError, match=r"client_config.yaml: fleet file does not exist .*-c FILE"):
        find_config_path(None)
    cfg = load_config(explicit)
    assert isinstance(cfg, FleetConfig) and cfg.path == explicit


def test_key_paths_allow_dotted_model_names() -> None:
    assert parse_key_path("models.llama-3.1-8b.servers[0].port", ["llama-3.1-8b", "llama"]) == [
        "models", "llama-3.1-8b", "servers", 0, "port"]
    assert parse_key_path('models."a.b".kind') == ["models", "a.b", "kind"]


# ---- the loader never raises anything but ConfigError --------------------------------------

KEYS = st.sampled_from([
    "routing", "benchmark", "models", "m", "n", "policy", "servers", "host", "port", "gpus", "cpus",
    "sim", "speed", "dim", "kind", "aliases", "api_key", "backend", "backend_args", "env", "command",
    "python", "device", "min_free_memory_gb", "max_retry", "messages", "role", "content",
    "stall_timeout_s", "request_timeout_s", "<<",
]) | st.text(max_size=6)
SCALARS = (st.none() | st.booleans() | st.integers(-3, 70000) | st.floats() | st.text(max_size=10)
           | st.sampled_from(["${MF_NOPE}", "${MF_NOPE:-7}", "$${x}", "${", "${1x}", "127.0.0.1",
                              "peak_ewma", "sim", "chat", "embedding", "cpu", "8080"]))
TREES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5),
                     max_leaves=12)
SERVERS = st.lists(st.dictionaries(st.sampled_from(["host", "port", "gpus", "sim", "min_free_memory_gb"]),
                                   TREES, max_size=4), max_size=3)
MODELS = st.dictionaries(
    st.text(max_size=4) | st.sampled_from(["m", "n"]),
    st.dictionaries(st.sampled_from(["kind", "aliases", "backend", "servers", "sim", "api_key",
                                     "backend_args", "env", "command", "device"]),
                    SERVERS | TREES, max_size=5),
    max_size=3)
SHAPED = st.fixed_dictionaries({"models": MODELS}, optional={"routing": TREES, "benchmark": TREES})
YAML_TEXT = (st.text(alphabet=st.sampled_from(list("ab:-[]{}, \n\t'\"&*!|>#%@`?$\\019<")), max_size=80)
             | st.text(max_size=40))


def _dump(data: object) -> str:
    buffer = io.StringIO()
    YAML().dump(data, buffer)
    return buffer.getvalue()


def _load_or_config_error(text: str, resolve_env: bool) -> None:
    try:
        parse_config(text, "fuzz.yaml", resolve_env=resolve_env)
    except ConfigError as exc:
        assert exc.problems and all(p.file == "fuzz.yaml" for p in exc.problems)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(YAML_TEXT, st.booleans())
def test_random_yaml_text_only_ever_raises_config_error(text: str, resolve_env: bool) -> None:
    _load_or_config_error(text, resolve_env)


@FUZZ
@given(st.dictionaries(KEYS, TREES, max_size=4) | TREES, st.booleans())
def test_random_structures_only_ever_raise_config_error(data: object, resolve_env: bool) -> None:
    _load_or_config_error(_dump(data), resolve_env)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(SHAPED, st.booleans())
def test_fleet_shaped_structures_only_ever_raise_config_error(data: object, resolve_env: bool) -> None:
    os.environ.pop("MF_NOPE", None)
    _load_or_config_error(_dump(data), resolve_env)


@st.composite
def valid_fleets(draw: st.DrawFn) -> dict:
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9.-]{0,8}", fullmatch=True), min_size=1, max_size=3,
                          unique=True))
    ports = iter(draw(st.lists(st.integers(1, 65535), min_size=3 * len(names), max_size=3 * len(names),
                               unique=True)))
    models = {}
    for name in names:
        count = draw(st.integers(1, 3))
        model: dict = {"kind": draw(st.sampled_from(["chat", "embedding"])),
                       "backend": draw(st.sampled_from(["vllm", "sglang", "sim"])),
                       "servers": [{"host": "127.0.0.1", "port": next(ports)} for _ in range(count)]}
        if draw(st.booleans()):
            model["sim"] = {"speed": draw(st.floats(0.1, 100))}
        models[name] = model
    return {"routing": {"policy": draw(st.sampled_from(["peak_ewma", "round_robin"]))}, "models": models}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_fleets())
def test_valid_configs_survive_edits(data: dict) -> None:
    text = _dump(data)
    before = parse_config(text, "fuzz.yaml")
    document = ConfigDocument(text, Path("fuzz.yaml"))
    assert document.text() == text  # an untouched document dumps byte for byte as read
    first = next(iter(before.models))
    used = {s.port for m in before.models.values() for s in m.servers}
    free = next(p for p in range(1, 70000) if p not in used)
    document.add_server(first, "127.0.0.1", free)
    document.set("routing.policy", "least_loaded")
    after = document.check()
    assert [s.port for s in after.models[first].servers] == [
        *(s.port for s in before.models[first].servers), free]
    assert after.routing.policy == "least_loaded"
    document.remove_server(first, "127.0.0.1", free)
    document.set("routing.policy", data["routing"]["policy"])
    assert document.text() == text

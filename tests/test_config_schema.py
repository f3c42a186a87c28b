"""Every key declared in modelfleet/config/schema.py is read, shown, masked if secret, and settable.

The test walks the schema, so a key added there (one `setting(...)` beside its
dataclass field) is checked here with no edit: if the reader, the display or the
editor needed a second edit for it, this fails.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from modelfleet.config import ConfigDocument, fleet_to_dict, load_config, mask_secrets, parse_config
from modelfleet.config.schema import (
    MAPPINGS,
    MASK,
    Key,
    all_keys,
    default_of,
    keys_of,
    record_patterns,
)

KEYS = all_keys()
SECRET_TEXT = "sk-sample-secret-0123456789"


# Values the declaration alone cannot make valid: names with a syntax of their own, and
# sections whose keys must come together (exactly one of dns / dns_srv / kubernetes).
SAMPLES: dict[str, Any] = {
    "models.*.discover": {"dns_srv": "_http._tcp.sample.fleet"},
    "models.*.discover.dns_srv": "_http._tcp.sample.fleet",
    "models.*.discover.nameserver": "127.0.0.1:5353",
    "models.*.discover.kubernetes": {"namespace": "sample-ns", "service": "sample", "port_name": "http"},
}
# A model that uses discover: for each key under it (a key there needs its siblings).
DISCOVER_BASES: dict[str, dict[str, Any]] = {
    "models.*.discover.kubernetes.port_name": {"kubernetes": {"namespace": "ns", "service": "svc"}},
    "models.*.discover.kubernetes": {"kubernetes": {"namespace": "ns", "service": "svc", "port": 8000}},
    "models.*.discover.dns_srv": {"dns_srv": "_http._tcp.llama.fleet"},
    "models.*.discover.": {"dns": "llama.fleet", "port": 8000},
}


def sample(pattern: str, key: Key) -> Any:
    """A valid value for a key that differs from its default, built from its declaration alone."""
    if pattern in SAMPLES:
        return SAMPLES[pattern]
    owner, name = record_patterns()[pattern.rsplit(".", 1)[0] if "." in pattern else ""], pattern.rsplit(".", 1)[-1]
    default = default_of(owner, name)
    kind = key.kind
    if kind in ("number", "integer"):
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            value = default + 1
        else:
            value = (key.above if key.above is not None else key.minimum or 0) + 1
        if kind == "integer":
            return int(value)
        if key.maximum is not None and float(value) + 0.5 > key.maximum:  # a fraction
            return (float(default) + key.maximum) / 2
        return float(value) + 0.5
    if kind == "switch":
        return not default
    if kind == "text":
        if key.secret:
            return SECRET_TEXT
        return next(c for c in key.choices if c != default) if key.choices else "sample-text"
    table: dict[str, Any] = {
        "indexes": [0, 1], "names": ["sample-alias"], "texts": [SECRET_TEXT], "argv": ["prog", "--flag"],
        "flags": {"sample-flag": 1}, "environment": {"MF_SAMPLE_TOKEN": SECRET_TEXT, "MF_PLAIN": "plain"},
        "messages": [{"role": "user", "content": "sample"}], "delay": 0.25,
    }
    if kind in table:
        return table[kind]
    first = next(iter(keys_of(key.of)))  # type: ignore[arg-type]
    if kind == "section":
        return {first: sample(f"{pattern}.{first}", keys_of(key.of)[first])}  # type: ignore[arg-type]
    minimal = minimal_record(pattern + ("[]" if kind == "records" else ".*"), key.of)  # type: ignore[arg-type]
    return [minimal] if kind == "records" else {"sample-name": minimal}


def minimal_record(pattern: str, record: type) -> dict[str, Any]:
    """Its required keys, and one key of each group it must set one of (servers or discover)."""
    groups: set[str] = set()
    wanted = [name for name, key in keys_of(record).items()
              if key.required or (key.one_of and key.one_of not in groups and not groups.add(key.one_of))]
    return {name: sample(f"{pattern}.{name}", keys_of(record)[name]) for name in wanted}


def tokens_of(pattern: str) -> list[str | int]:
    tokens: list[str | int] = []
    for part in pattern.split("."):
        tokens += ["m"] if part == "*" else [part[:-2], 0] if part.endswith("[]") else [part]
    return tokens


def path_text(tokens: list[str | int]) -> str:
    return ".".join(str(t) for t in tokens).replace(".0", "[0]")


def put(data: dict[str, Any], tokens: list[str | int], value: Any) -> dict[str, Any]:
    node: Any = data
    for token in tokens[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(token, {})
        else:
            node = node[token]
    node[tokens[-1]] = value
    return data


def at(data: Any, tokens: list[str | int]) -> Any:
    for token in tokens:
        data = data[token]
    return data


def contains(shown: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(shown, dict) and all(k in shown and contains(shown[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(shown, list) and len(shown) == len(wanted) and all(map(contains, shown, wanted))
    return bool(shown == wanted)


def dump(data: Any) -> str:
    buffer = io.StringIO()
    YAML().dump(data, buffer)
    return buffer.getvalue()


def flow(value: Any) -> str:
    yaml = YAML()
    yaml.default_flow_style = True
    buffer = io.StringIO()
    yaml.dump(value, buffer)
    return buffer.getvalue().strip().removesuffix("...").strip()


def base(pattern: str = "") -> dict[str, Any]:
    """A valid fleet to set the key of `pattern` in: a model with servers, or with discover:
    for the keys of discover (a model has one or the other)."""
    if pattern == "models.*.discover":
        return {"models": {"m": {"backend": "sim"}}}
    for prefix, discover in DISCOVER_BASES.items():
        if pattern.startswith(prefix):
            return {"models": {"m": {"backend": "sim", "discover": copy.deepcopy(discover)}}}
    return {"models": {"m": {"backend": "sim", "servers": [{"host": "h", "port": 1}]}}}


def test_the_schema_declares_every_key_of_the_fleet_file() -> None:
    assert {"routing.policy", "models.*.api_key", "models.*.servers[].port", "models.*.sim.speed",
            "models.*.servers[].sim.seed", "benchmark.max_tokens"} <= set(KEYS)
    assert all(key.help for key in KEYS.values()), "every key needs its help text"


@pytest.mark.parametrize("pattern", list(KEYS))
def test_each_declared_key_is_read_and_shown(pattern: str) -> None:
    tokens, value = tokens_of(pattern), sample(pattern, KEYS[pattern])
    config = parse_config(dump(put(base(pattern), tokens, value)), "fleet.yaml")
    shown = fleet_to_dict(config, mask_secrets=False)
    assert contains(at(shown, tokens), value), f"{pattern}: read or shown wrong: {at(shown, tokens)!r}"


@pytest.mark.parametrize("pattern", [p for p, k in KEYS.items() if k.secret or k.secret_entries])
def test_each_secret_key_is_masked(pattern: str) -> None:
    key, tokens, value = KEYS[pattern], tokens_of(pattern), sample(pattern, KEYS[pattern])
    text = dump(put(base(pattern), tokens, value))
    config = parse_config(text, "fleet.yaml")
    masked = fleet_to_dict(config)
    assert SECRET_TEXT not in repr(config) and SECRET_TEXT not in str(masked)
    assert SECRET_TEXT not in str(mask_secrets(YAML().load(text)))
    shown = at(masked, tokens)
    assert shown == MASK if key.secret else MASK in shown.values()


@pytest.mark.parametrize("pattern", list(KEYS))
def test_each_declared_key_can_be_set_by_command(pattern: str, tmp_path: Path) -> None:
    tokens, value = tokens_of(pattern), sample(pattern, KEYS[pattern])
    path = tmp_path / "fleet.yaml"
    path.write_text(dump(base(pattern)))  # sections missing from it are created by the set
    document = ConfigDocument.open(path)
    document.set(path_text(tokens), flow(value))
    document.save()
    shown = fleet_to_dict(load_config(path), mask_secrets=False)
    assert contains(at(shown, tokens), value), f"{pattern}: `config set` did not take {value!r}"


@pytest.mark.parametrize("pattern", [p for p, k in KEYS.items() if k.kind in MAPPINGS and not k.required])
def test_each_optional_section_is_created_by_setting_a_key_inside_it(pattern: str, tmp_path: Path) -> None:
    key, tokens = KEYS[pattern], tokens_of(pattern)
    inner_name, inner_value = next(iter(sample(pattern, key).items()))
    path = tmp_path / "fleet.yaml"
    path.write_text(dump(base(pattern)))
    document = ConfigDocument.open(path)
    document.set(path_text([*tokens, inner_name]), flow(inner_value))
    document.save()
    shown = fleet_to_dict(load_config(path), mask_secrets=False)
    assert contains(at(shown, tokens), {inner_name: inner_value})

"""Showing the config: plain data with every default filled in and every secret masked.

What is printed, and when, follows each key's `setting(...)` in schema.py
(`show`, `secret`, `secret_entries`, `default_from`); nothing here names a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from modelfleet.config.schema import MASK, FleetConfig, Key, is_secret, keys_of
from modelfleet.config.values import VAR_REF, join

_UNSET = (None, "", (), [], {})


def fleet_to_dict(config: FleetConfig, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The config with every default filled in, as `config show` prints it.

    Secrets (api_key, and env values whose names look like tokens) become `***`
    unless mask_secrets is False, which nothing that prints should ever pass.
    """
    return _record(config, mask_secrets)


def _record(record: Any, mask: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, key in keys_of(type(record)).items():
        value = getattr(record, name)
        if key.default_from and value in _UNSET:
            value = getattr(record, key.default_from)
        if key.show == "if_set" and value in _UNSET:
            continue
        if callable(key.show) and not key.show(record):
            continue
        out[name] = _plain(key, value, mask)
    return out


def _plain(key: Key, value: Any, mask: bool) -> Any:
    if key.secret and mask:
        return MASK
    if key.kind == "section":
        return _record(value, mask)
    if key.kind == "records":
        return [_record(item, mask) for item in value]
    if key.kind == "named":
        return {name: _record(item, mask) for name, item in value.items()}
    if key.kind == "messages":
        return [dict(message) for message in value]
    if isinstance(value, Mapping):
        secret = key.secret_entries if mask else None
        return {k: (MASK if secret is not None and secret.search(k) else v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def dump_yaml(data: Any) -> str:
    """Plain data as block YAML (short lists of scalars stay on one line)."""
    import io

    yaml = YAML(typ="rt")
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    buffer = io.StringIO()
    yaml.dump(_flow_short_lists(data), buffer)
    return buffer.getvalue()


def _flow_short_lists(data: Any) -> Any:
    if isinstance(data, dict):
        out = CommentedMap()
        for key, value in data.items():
            out[key] = _flow_short_lists(value)
        return out
    if isinstance(data, (list, tuple)):
        seq = CommentedSeq(_flow_short_lists(v) for v in data)
        if all(not isinstance(v, (dict, list, tuple)) for v in data):
            seq.fa.set_flow_style()
        return seq
    return data


def mask_secrets(data: Any, path: str = "") -> Any:
    """A copy of plain or round-trip data with secret values replaced by `***`.

    `path` is the key path of `data` (e.g. `models.m.api_key`), which decides what is secret.
    """
    if isinstance(data, dict):
        return {k: mask_secrets(v, join(path, str(k))) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [mask_secrets(v, path) for v in data]
    if is_secret(path) and data is not None and not _only_var_refs(data):
        return MASK
    return data


def _only_var_refs(value: Any) -> bool:
    """`${FLEET_API_KEY}` names where a secret comes from without being one."""
    return isinstance(value, str) and bool(value.strip()) and not VAR_REF.sub("", value).strip()

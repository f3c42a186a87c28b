"""Editing the fleet file by command, keeping its comments, order and layout.

Everything that changes the file goes through ConfigDocument, so an edit can
never leave a broken file. Where `set` may create a missing section, and which
keys a hint may suggest, follow the schema (schema.creatable, schema.known_keys).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from modelfleet.config.layout import (
    append,
    atomic_write,
    guess_indent,
    is_flow,
    last_key,
    put_trailing,
    remove_entry,
    take_trailing,
)
from modelfleet.config.reader import Reader, parse_config
from modelfleet.config.schema import FleetConfig, creatable, known_keys
from modelfleet.config.show import fleet_to_dict
from modelfleet.config.source import (
    find_config_path,
    line_of_node,
    load_yaml,
    read_text,
    round_trip_yaml,
)
from modelfleet.config.values import INVALID, join, type_name
from modelfleet.errors import ConfigError, ConfigProblem, UsageError

# Paths (model names as *, list indexes as []) where `set` may create a missing mapping.
_CREATABLE = creatable()


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) from the command line; UsageError says the expected form."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text) or re.fullmatch(r"([^\s:/\[\]]+):(\d+)", text)
    if m is None:
        raise UsageError(f"{text!r} is not HOST:PORT; write it like 127.0.0.1:8101 "
                         "(or [::1]:8101 for IPv6)")
    return m.group(1), int(m.group(2))


def parse_index_list(text: str, what: str) -> list[int]:
    """`0,1,3` (GPU or CPU indexes) from the command line."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"{what} must be comma-separated indexes like 0,1; got {text!r}")
    return [int(p) for p in parts]


class ConfigDocument:
    """The fleet file as round-trip YAML, edited in memory and saved only when still valid.

    Everything that changes the file goes through here, so an edit can never
    leave a broken file: `save` checks the new text (structure only, so unset
    `${VAR}`s do not block an edit) and writes it atomically, or raises
    ConfigError and leaves the file byte for byte as it was.
    """

    def __init__(self, text: str, path: Path) -> None:
        self.path = path
        self.original_text = text
        self._yaml = round_trip_yaml()
        mapping, sequence, offset = guess_indent(text)
        self._yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        data = load_yaml(text, str(path))
        if not isinstance(data, CommentedMap):
            raise ConfigError([ConfigProblem(str(path), line_of_node(data, 1), "",
                                             f"the top level must be a mapping, got {type_name(data)}")])
        self.data: CommentedMap = data

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> ConfigDocument:
        found = find_config_path(path)
        return cls(read_text(found), found)

    # ---- reading ---------------------------------------------------------------------------

    def text(self) -> str:
        import io

        buffer = io.StringIO()
        self._yaml.dump(self.data, buffer)
        return buffer.getvalue()

    def check(self) -> FleetConfig:
        """The edited text, checked for structure (no `${VAR}` needs to be set)."""
        return replace(parse_config(self.text(), str(self.path), resolve_env=False), path=self.path)

    def get(self, key_path: str) -> Any:
        """The value at KEY.PATH as written in the file, else its default."""
        tokens = self._tokens(key_path)
        found, value = _walk(self.data, tokens)
        if found:
            return value
        try:
            defaults = fleet_to_dict(parse_config(self.text(), str(self.path), resolve_env=False),
                                     mask_secrets=False)
        except ConfigError:
            defaults = {}
        found, value = _walk(defaults, tokens)
        if found:
            return value
        raise UsageError(f"{key_path}: not in {self.path} and has no default; "
                         f"`modelfleet config show` lists every key")

    # ---- editing ---------------------------------------------------------------------------

    def set(self, key_path: str, value_text: str) -> None:
        """Set KEY.PATH to VALUE, read as YAML (`8081` is a number, `"8081"` a string)."""
        tokens = self._tokens(key_path)
        value = _parse_value(value_text)
        node: Any = self.data
        for depth, token in enumerate(tokens[:-1]):
            here = _path_text(tokens[:depth + 1])
            if isinstance(token, int):
                node = _list_item(node, token, here)
                continue
            if not isinstance(node, dict):
                raise UsageError(f"{_path_text(tokens[:depth]) or 'the top level'} is not a mapping, "
                                 f"so it has no {token!r}")
            if token not in node or node[token] is None:
                self._create(node, tokens, depth, value)
                return
            node = node[token]
        last = tokens[-1]
        if isinstance(last, int):
            _list_item(node, last, key_path)
            node[last] = value
        elif isinstance(node, dict):
            if last in node:
                node[last] = value
            else:
                append(node, last, value)
        else:
            raise UsageError(f"{_path_text(tokens[:-1])} is not a mapping, so it has no {last!r}")

    def _create(self, node: CommentedMap, tokens: Sequence[str | int], depth: int, value: Any) -> None:
        """Create the missing mappings from tokens[depth] down, holding value at the end."""
        for end in range(depth + 1, len(tokens)):
            if isinstance(tokens[end - 1], int) or _pattern(tokens[:end]) not in _CREATABLE:
                raise UsageError(_unknown_path_message(tokens[:end]))
        chain = value
        for token in reversed(tokens[depth + 1:]):
            if isinstance(token, int):
                raise UsageError(f"{_path_text(tokens)}: cannot create a list item by index")
            chain = CommentedMap([(token, chain)])
        if tokens[depth] in node:
            node[tokens[depth]] = chain
        else:
            append(node, tokens[depth], chain)

    def add_server(self, model: str, host: str, port: int, gpus: Sequence[int] | None = None,
                   min_free_memory_gb: float | None = None) -> None:
        spec = self._model_node(model)
        servers = spec.get("servers")
        if not isinstance(servers, list):
            servers = spec["servers"] = CommentedSeq()
        item = CommentedMap([("host", host), ("port", port)])
        if gpus is not None:
            gpu_list = CommentedSeq(gpus)
            gpu_list.fa.set_flow_style()
            item["gpus"] = gpu_list
        if min_free_memory_gb is not None:
            item["min_free_memory_gb"] = (int(min_free_memory_gb) if float(min_free_memory_gb).is_integer()
                                          else min_free_memory_gb)
        if not servers or is_flow(servers[-1]):
            item.fa.set_flow_style()
        append(servers, None, item)

    def remove_server(self, model: str, host: str, port: int) -> None:
        name = self._model_key(model)
        servers = self._model_node(model).get("servers")
        servers = servers if isinstance(servers, list) else []
        matches = [i for i, item in enumerate(servers) if isinstance(item, dict)
                   and host in _spellings(item.get("host")) and str(port) in _spellings(item.get("port"))]
        if not matches:
            known = ", ".join(f"{s.get('host')}:{s.get('port')}" for s in servers
                              if isinstance(s, dict)) or "none"
            raise UsageError(f"{name} has no server {host}:{port}; its servers: {known}")
        if len(servers) == 1:
            raise UsageError(f"{host}:{port} is the last server of {name}; a model needs at least "
                             f"one (remove the whole model with `modelfleet config remove-model {name}`)")
        remove_entry(servers, matches[0])

    def add_model(self, name: str, kind: str, backend: str, servers: Sequence[tuple[str, int]],
                  model_path: str | None = None) -> None:
        if not servers:
            raise UsageError(f"a model needs at least one server: add --server HOST:PORT to {name}")
        models = self._models()
        if name in models:
            raise UsageError(f"model {name} already exists; add servers to it with "
                             f"`modelfleet config add-server {name} HOST:PORT`")
        entry = CommentedMap([("kind", kind), ("backend", backend)])
        if model_path is not None:
            entry["model_path"] = model_path
        seq = CommentedSeq()
        for host, port in servers:
            item = CommentedMap([("host", host), ("port", port)])
            item.fa.set_flow_style()
            seq.append(item)
        entry["servers"] = seq
        trailing = take_trailing(models, last_key(models)) if models else ""
        models[name] = entry
        if len(models) > 1 and trailing.startswith("\n"):  # models are set apart by blank lines
            put_trailing(models, list(models)[-2], "\n")
        put_trailing(models, name, trailing)

    def remove_model(self, name: str) -> None:
        models = self._models()
        key = self._model_key(name)
        if len(models) == 1:
            raise UsageError(f"{key} is the only model; a fleet file needs at least one")
        remove_entry(models, key)

    # ---- saving ----------------------------------------------------------------------------

    def save(self) -> FleetConfig:
        """Check, then write atomically; on any problem the file stays as it was."""
        text = self.text()
        config = replace(parse_config(text, str(self.path), resolve_env=False), path=self.path)
        try:
            current = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            current = None
        if current != self.original_text:
            raise ConfigError([ConfigProblem(str(self.path), None, "", "the file changed while it was "
                                             "being edited; nothing was written, run the command again")])
        if text != self.original_text:
            atomic_write(self.path, text)
            self.original_text = text
        return config

    # ---- helpers ---------------------------------------------------------------------------

    def _models(self) -> CommentedMap:
        models = self.data.get("models")
        if models is None:
            models = self.data["models"] = CommentedMap()
        if not isinstance(models, dict):
            raise UsageError(f"models in {self.path} is not a mapping; fix it by hand first "
                             "(`modelfleet config validate` shows where)")
        return models

    def _model_key(self, model: str) -> str:
        models = self._models()
        if model in models:
            return model
        for key, body in models.items():
            aliases = body.get("aliases") if isinstance(body, dict) else None
            if isinstance(aliases, list) and model in [str(a) for a in aliases]:
                return str(key)
        known = ", ".join(str(k) for k in models) or "(none)"
        raise UsageError(f"no model {model!r} in {self.path}; known models: {known}")

    def _model_node(self, model: str) -> CommentedMap:
        key = self._model_key(model)
        node = self._models()[key]
        if not isinstance(node, dict):
            raise UsageError(f"models.{key} is not a mapping; fix it by hand first")
        return node

    def _tokens(self, key_path: str) -> list[str | int]:
        models = self.data.get("models")
        names = [str(k) for k in models] if isinstance(models, dict) else []
        return parse_key_path(key_path, names)


def parse_key_path(key_path: str, model_names: Sequence[str] = ()) -> list[str | int]:
    """`models.llama-3.1-8b.servers[0].port` -> ["models", "llama-3.1-8b", "servers", 0, "port"].

    Model names may hold dots, so after `models.` the longest known model name
    wins; any key may also be quoted (`models."a.b".kind`).
    """
    text = key_path.strip()
    tokens: list[str | int] = []
    pos = 0
    bad = UsageError(f"{key_path!r} is not a key path; write it like routing.policy or "
                     "models.llama-8b.servers[0].port")
    while pos < len(text):
        if tokens and text[pos] == "[":
            m = re.compile(r"\[(-?\d+)\]").match(text, pos)
            if m is None:
                raise bad
            tokens.append(int(m.group(1)))
            pos = m.end()
            continue
        if tokens:
            if text[pos] != ".":
                raise bad
            pos += 1
        if pos < len(text) and text[pos] in "\"'":
            end = text.find(text[pos], pos + 1)
            if end < 0:
                raise bad
            tokens.append(text[pos + 1:end])
            pos = end + 1
            continue
        if tokens == ["models"]:
            match = next((n for n in sorted(model_names, key=len, reverse=True)
                          if text.startswith(n, pos) and text[pos + len(n):pos + len(n) + 1] in ("", ".", "[")),
                         None)
            if match:
                tokens.append(match)
                pos += len(match)
                continue
        m = re.compile(r"[^.\[\]\"']+").match(text, pos)
        if m is None:
            raise bad
        tokens.append(m.group(0))
        pos = m.end()
    if not tokens or isinstance(tokens[0], int):
        raise bad
    return tokens


def _path_text(tokens: Sequence[str | int]) -> str:
    out = ""
    for token in tokens:
        out = f"{out}[{token}]" if isinstance(token, int) else join(out, token)
    return out


def _pattern(tokens: Sequence[str | int]) -> str:
    parts: list[str] = []
    for i, token in enumerate(tokens):
        if isinstance(token, int):
            parts[-1] += "[]"
        elif i == 1 and tokens[0] == "models":
            parts.append("*")
        else:
            parts.append(token)
    return ".".join(parts)


def _unknown_path_message(tokens: Sequence[str | int]) -> str:
    last = tokens[-1]
    parent = _pattern(tokens[:-1])
    known = known_keys(parent)
    if parent == "models":
        return (f"{_path_text(tokens)}: no such model; add one with "
                "`modelfleet config add-model NAME --kind ... --backend ... --server HOST:PORT`")
    close = difflib.get_close_matches(str(last), known, n=1, cutoff=0.6)
    sections = [k for k in known if _pattern([*tokens[:-1], k]) in _CREATABLE]
    if close:
        hint = f"; did you mean {close[0]!r}?"
    elif sections:
        hint = f"; sections here: {', '.join(sections)}"
    else:
        hint = f"; {_path_text(tokens[:-1])} holds plain values only" if tokens[:-1] else ""
    return f"{_path_text(tokens)}: no such section{hint}"


def _walk(node: Any, tokens: Sequence[str | int]) -> tuple[bool, Any]:
    for token in tokens:
        if isinstance(token, int):
            if not isinstance(node, list) or not -len(node) <= token < len(node):
                return False, None
            node = node[token]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            return False, None
    return True, node


def _list_item(node: Any, index: int, path: str) -> Any:
    if not isinstance(node, list):
        raise UsageError(f"{path}: not a list, so it has no item [{index}]")
    if not -len(node) <= index < len(node):
        raise UsageError(f"{path}: the list has {len(node)} item(s), use an index from 0 to "
                         f"{len(node) - 1} (add servers with `modelfleet config add-server`)")
    return node[index]


def _parse_value(value_text: str) -> Any:
    """A command-line VALUE read as YAML: a scalar or a flow list / mapping."""
    if value_text.strip() == "":
        return ""
    try:
        value = round_trip_yaml().load(value_text)
    except Exception:
        raise UsageError(f"{value_text!r} is not a YAML value; quote strings that hold "
                         "special characters, e.g. '\"a: b\"'") from None
    if isinstance(value, (CommentedMap, CommentedSeq)) and not value.fa.flow_style():
        value.fa.set_flow_style()
    return value


def _spellings(value: Any) -> set[str]:
    """A host or port as written and as it resolves here (`${HOST:-10.0.0.3}` matches 10.0.0.3)."""
    written = str(value).strip()
    reader = Reader("", resolve_env=True)
    resolved = reader.substitute(written, "", None) if "$" in written else written
    return {written} | ({str(resolved).strip()} if resolved is not INVALID else set())

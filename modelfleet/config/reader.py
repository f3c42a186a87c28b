"""Reading the fleet file: the YAML walked along the schema, every problem collected at once.

No key is named here: each record's keys, checks and defaults come from its
`setting(...)` declarations in schema.py, and one rule per value kind reads them.
Only the rules that tie records together live here: one host:port per server
across the fleet, and an alias names one model only.

With resolve_env=False (a structure-only check, for editing) `${VAR}`s stay as
written: string fields hold the reference itself and numeric fields whose value
is a reference keep their default (a required one, such as a port, holds the
text), so such a config is for checking, not running.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, fields, replace
from typing import Any

from modelfleet.config.schema import (
    CHILDREN,
    MESSAGE_KEYS,
    FleetConfig,
    Key,
    ServerSpec,
    default_of,
    keys_of,
)
from modelfleet.config.source import (
    find_config_path,
    line_of_key,
    line_of_node,
    load_yaml,
    read_text,
)
from modelfleet.config.values import (
    INVALID,
    Deferred,
    ValueReader,
    is_number,
    join,
    num,
    shown,
    type_name,
)
from modelfleet.errors import ConfigError, ConfigProblem

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_config(path: str | os.PathLike[str] | None = None, *, resolve_env: bool = True) -> FleetConfig:
    """Read and check the fleet file; raises ConfigError listing every problem in it.

    With resolve_env=False the `${VAR}`s are left as written and need not be set
    (a structure-only check, as editing needs on a machine without the secrets).
    """
    found = find_config_path(path)
    cfg = parse_config(read_text(found), str(found), resolve_env=resolve_env)
    return replace(cfg, path=found)


def reload_config(config: FleetConfig, *, resolve_env: bool = True) -> FleetConfig:
    """Read the file a config came from again (the launcher's SIGHUP)."""
    return load_config(config.path, resolve_env=resolve_env)


def parse_config(text: str, filename: str = "<config>", *, resolve_env: bool = True) -> FleetConfig:
    """Parse and check fleet-file text; never raises anything but ConfigError."""
    data = load_yaml(text, filename)
    reader = Reader(filename, resolve_env)
    cfg = reader.fleet(data)
    if reader.problems or cfg is None:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line or 0)
                          or [ConfigProblem(filename, None, "", "invalid config")])
    return cfg


class Reader(ValueReader):
    """Walks the parsed YAML once along the schema, building the records."""

    def __init__(self, filename: str, resolve_env: bool) -> None:
        super().__init__(filename, resolve_env)
        self.addresses: dict[tuple[str, Any], tuple[str, int | None]] = {}  # host:port -> where
        self.alias_lines: dict[str, list[tuple[str, int | None, str]]] = {}  # model -> its aliases

    def fleet(self, data: Any) -> FleetConfig | None:
        if not isinstance(data, dict):
            names = [f"{k}:" for k in keys_of(FleetConfig)]
            self.problem(line_of_node(data, 1), "", f"the top level must be a mapping with "
                         f"{', '.join(names[:-1])} and {names[-1]}, got {type_name(data)}")
            return None
        config = self.record(FleetConfig, data, "", 1)
        return None if self.problems or config is INVALID else config

    def record(self, record: type, node: Any, path: str, line: int | None, *,
               owner: dict[str, Any] | None = None, base: Any = None,
               extra: dict[str, Any] | None = None) -> Any:
        """One record (a dataclass of the schema) from a mapping; INVALID if it had problems.

        owner holds the enclosing record's values read so far; base, when given, is
        the record that unset keys fall back to (a server's sim over its model's);
        extra holds its fields that are not keys (a model's name, a server's line).
        """
        extra = extra or {}
        keys = keys_of(record)
        required = [name for name, key in keys.items() if key.required and not key.missing]
        before = len(self.problems)
        entries = self.mapping(node, path, line, list(keys), required=required)
        if entries is None:
            return INVALID
        values: dict[str, Any] = {}
        order = [n for n in entries if keys[n].kind not in CHILDREN] + [n for n in entries if keys[n].kind in CHILDREN]
        for name in order:
            value, key_line = entries[name]
            values[name] = self.value(name, keys[name], value, join(path, name), key_line,
                                      values=values, owner=owner or {}, extra=extra)
        for name, key in keys.items():
            if key.missing and name not in entries:
                self.problem(line, join(path, name), key.missing)
        self.relations(record, keys, entries, values, path)
        self.groups(record, keys, entries, path, line)
        if record is ServerSpec:
            self.unique_address(path, entries, values)
        if len(self.problems) > before:
            return INVALID
        kwargs: dict[str, Any] = {}
        for name, key in keys.items():
            value = values.get(name, INVALID)
            if isinstance(value, Deferred):  # unresolved ${VAR}: text keeps it, a number its default
                if key.kind in ("number", "integer") and default_of(record, name) is not MISSING:
                    continue
                value = str(value)
            if value is not INVALID:
                kwargs[name] = value
            elif key.default_from:
                kwargs[name] = extra[key.default_from]
        if base is not None:
            return replace(base, **kwargs)
        return record(**{**extra, **kwargs})

    def relations(self, record: type, keys: dict[str, Key], entries: dict[str, tuple[Any, int | None]],
                  values: dict[str, Any], path: str) -> None:
        """The checks a key declares against a sibling: at_most, conflicts."""
        good = {n: v for n, v in values.items() if v is not INVALID and not isinstance(v, Deferred)}
        for name, key in keys.items():
            if key.conflicts and name in entries and key.conflicts[0] in entries:
                self.problem(entries[name][1], join(path, name), key.conflicts[1])
            if key.at_most and (name in good or key.at_most in good):
                mine = good.get(name, default_of(record, name))
                limit = good.get(key.at_most, default_of(record, key.at_most))
                if mine > limit:
                    at = name if name in good else key.at_most
                    self.problem(entries[at][1], join(path, at), f"{name} ({num(mine)}) must not "
                                 f"exceed {key.at_most} ({num(limit)})")

    def groups(self, record: type, keys: dict[str, Key], entries: dict[str, tuple[Any, int | None]], path: str,
               line: int | None) -> None:
        """The checks keys declare together: one_of (exactly one of a group), requires, only_with."""
        given = {name for name, (value, _) in entries.items() if value is not None}
        groups: dict[str, list[str]] = {}
        for name in (f.name for f in fields(record) if f.name in keys):  # as declared
            key = keys[name]
            if key.one_of:
                groups.setdefault(key.one_of, []).append(name)
            if name not in given:
                continue
            if key.requires and key.requires[0] not in given:
                self.problem(entries[name][1], join(path, name), key.requires[1])
            if key.only_with and not given & set(key.only_with):
                self.problem(entries[name][1], join(path, name),
                             f"goes with {' or '.join(key.only_with)} only; remove it")
        for first, *others in groups.values():
            present = [name for name in (first, *others) if name in given]
            if not present:
                alternatives = ", or ".join(f"{n!r}: {keys[n].help}" for n in others)
                self.problem(line, path, f"missing required key {first!r} (or {alternatives})")
            elif len(present) > 1:
                self.problem(entries[present[1]][1], join(path, present[1]),
                             f"give only one of {', '.join(present)}")

    def value(self, name: str, key: Key, node: Any, path: str, line: int | None, *, values: dict[str, Any],
              owner: dict[str, Any], extra: dict[str, Any]) -> Any:
        """One key's value, checked by the rule of its kind."""
        kind = key.kind
        if kind in ("number", "integer"):
            return self.number(node, path, line, above=key.above, minimum=key.minimum,
                               maximum=key.maximum, integer=kind == "integer")
        if kind == "text":
            result = self.text(node, path, line, choices=key.choices, nonempty=key.blank == "error")
            if result == "" and key.blank == "none":  # so `${KEY:-}` makes a key optional
                return None
            wrong = key.check(result) if key.check and isinstance(result, str) \
                and not isinstance(result, Deferred) else None
            if wrong:
                self.problem(line, path, f"{wrong}, got {shown(result, path)}")
                return INVALID
            return result
        if kind == "switch":
            return self.scalar(node, path, line, "bool")
        if kind == "delay":
            return self.delay(node, path, line)
        if kind == "indexes":
            result = self.int_list(node, path, line, key.what)
            if key.forbidden_when and result:
                other, bad, message = key.forbidden_when
                if owner.get(other) == bad:
                    self.problem(line, path, message)
            return result
        if kind == "section":
            base = owner.get(name) if key.inherits else None
            if key.inherits and not isinstance(base, key.of):  # type: ignore[arg-type]
                base = key.of() if key.of else None  # the owner's own value did not read
            return self.record(key.of, node, path, line, base=base)  # type: ignore[arg-type]
        if kind == "records":
            return self.records(key, node, path, line, owner=values)
        if kind == "named":
            return self.named(key, node, path, line)
        reader = {"names": self.names, "texts": self.texts, "argv": self.argv, "flags": self.flags,
                  "environment": self.environment, "messages": self.messages}[kind]
        return reader(key, node, path, line, extra.get("name", ""))

    # ---- the list and mapping kinds ---------------------------------------------------------

    def records(self, key: Key, node: Any, path: str, line: int | None, *, owner: dict[str, Any]) -> Any:
        items = self.items(node, path, line)
        if items is None:
            return INVALID
        if not items:
            self.problem(line, path, key.empty)
        result = [self.record(key.of, item, item_path, item_line, owner=owner, extra={"line": item_line})  # type: ignore[arg-type]
                  for item, item_line, item_path in items]
        return INVALID if not items or INVALID in result else tuple(result)

    def named(self, key: Key, node: Any, path: str, line: int | None) -> Any:
        if not isinstance(node, dict):
            self.problem(line, path, f"must be a mapping of model name to its settings, got {type_name(node)}")
            return INVALID
        if not node:
            self.problem(line, path, key.empty)
            return INVALID
        result: dict[str, Any] = {}
        for name, body in node.items():
            key_line = line_of_key(node, name, line)
            if not isinstance(name, str) or not name.strip():
                quote = f'; quote it: "{name}":' if isinstance(name, (int, float)) else ""
                self.problem(key_line, path, f"model names must be non-empty strings, got "
                             f"{shown(name, '')}{quote}")
                continue
            spec = self.record(key.of, body, join(path, str(name)), key_line, extra={"name": str(name)})  # type: ignore[arg-type]
            if spec is not INVALID:
                result[str(name)] = spec
        self.unique_aliases({str(n) for n in node if isinstance(n, str)})
        return result

    def names(self, key: Key, node: Any, path: str, line: int | None, record_name: str) -> Any:
        """Other names of the record (aliases): unique here, and across records (unique_aliases)."""
        entries = self.items(node, path, line)
        if entries is None:
            return INVALID
        result: list[str] = []
        for item, item_line, item_path in entries:
            alias = self.text(item, item_path, item_line)
            if alias is INVALID:
                continue
            if alias in result:
                self.problem(item_line, item_path, f"alias {alias!r} is listed twice")
                continue
            result.append(alias)
            self.alias_lines.setdefault(record_name, []).append((alias, item_line, item_path))
        return tuple(result)

    def texts(self, key: Key, node: Any, path: str, line: int | None, record_name: str) -> Any:
        """A list of strings; an empty one (`${KEY:-}` with KEY unset) is left out. A
        `${VAR}` unset here stays as written (`Deferred`): these are the gateway's keys,
        resolved when it starts, and a client reading the same file needs none of them."""
        entries = self.items(node, path, line)
        if entries is None:
            return INVALID
        result = [self.substitute(item, item_path, item_line, unset_ok=True)
                  if isinstance(item, str) and "$" in item
                  else self.text(item, item_path, item_line, nonempty=False)
                  for item, item_line, item_path in entries]
        if INVALID in result:
            return INVALID
        return tuple(text if isinstance(text, str) else str(text)
                     for text in result if str(text).strip())

    def filled_items(self, key: Key, node: Any, path: str, line: int | None,
                     ) -> list[tuple[Any, int | None, str]] | None:
        """A list's items, or None once it is reported as not a list or as empty."""
        entries = self.items(node, path, line)
        if entries is not None and not entries:
            self.problem(line, path, key.empty)
            return None
        return entries

    def argv(self, key: Key, node: Any, path: str, line: int | None, record_name: str) -> Any:
        entries = self.filled_items(key, node, path, line)
        if entries is None:
            return INVALID
        argv = [self.scalar(item, item_path, item_line, "str") for item, item_line, item_path in entries]
        return INVALID if INVALID in argv else tuple(argv)

    def flags(self, key: Key, node: Any, path: str, line: int | None, record_name: str) -> Any:
        if not isinstance(node, dict):
            self.problem(line, path, f"must be a mapping of engine flag to value (e.g. "
                         f"{{max-model-len: 32768}}), got {type_name(node)}")
            return INVALID
        result: dict[str, Any] = {}
        for name, value in node.items():
            key_line = line_of_key(node, name, line)
            if not isinstance(name, str) or not name.strip():
                self.problem(key_line, path, f"flag names must be strings, got {shown(name, '')}")
                continue
            if name.startswith("-"):
                self.problem(key_line, join(path, name), f"write the flag without dashes: "
                             f"{name.lstrip('-')!r}")
                continue
            converted = self.plain(value, join(path, name), key_line)
            if converted is not INVALID:
                result[str(name)] = converted
        return result

    def environment(self, key: Key, node: Any, path: str, line: int | None, record_name: str) -> Any:
        if not isinstance(node, dict):
            self.problem(line, path, f"must be a mapping of variable name to value, got {type_name(node)}")
            return INVALID
        result: dict[str, str] = {}
        for name, value in node.items():
            key_line = line_of_key(node, name, line)
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                self.problem(key_line, path, f"environment variable names are letters, digits and _, "
                             f"got {shown(name, '')}")
                continue
            sub = join(path, name)
            if is_number(value):
                value = str(value)
            elif not isinstance(value, str):
                self.problem(key_line, sub, f"must be a string (quote it), got {type_name(value)}")
                continue
            converted = self.scalar(value, sub, key_line, "str")
            if converted is not INVALID:
                result[str(name)] = str(converted)
        return result

    def messages(self, key: Key, node: Any, path: str, line: int | None, record_name: str) -> Any:
        entries = self.filled_items(key, node, path, line)
        if entries is None:
            return INVALID
        result = []
        for item, item_line, item_path in entries:
            fields_ = self.mapping(item, item_path, item_line, MESSAGE_KEYS, required=MESSAGE_KEYS)
            if fields_ is None:
                continue
            message = {name: self.text(value, join(item_path, name), key_line, nonempty=name == "role")
                       for name, (value, key_line) in fields_.items()}
            if INVALID not in message.values():
                result.append(message)
        return tuple(result)

    # ---- rules that tie records together ------------------------------------------------------

    def unique_address(self, path: str, entries: dict[str, tuple[Any, int | None]],
                       values: dict[str, Any]) -> None:
        host, port = values.get("host", INVALID), values.get("port", INVALID)
        if host is INVALID or port is INVALID:
            return
        address = (str(host).lower(), port)
        port_line = entries["port"][1]
        if address in self.addresses:
            other_path, other_line = self.addresses[address]
            where = f" (line {other_line})" if other_line else ""
            self.problem(port_line, path, f"{host}:{port} is already used by {other_path}{where}; "
                         "each server needs its own host:port")
        else:
            self.addresses[address] = (path, port_line)

    def unique_aliases(self, model_names: set[str]) -> None:
        owners: dict[str, str] = {}
        for model_name, aliases in self.alias_lines.items():
            for alias, alias_line, alias_path in aliases:
                if alias in model_names:
                    self.problem(alias_line, alias_path, f"alias {alias!r} is also the name of a model; "
                                 "an alias must name one model only")
                elif alias in owners and owners[alias] != model_name:
                    self.problem(alias_line, alias_path, f"alias {alias!r} is also an alias of model "
                                 f"{owners[alias]!r}; an alias must name one model only")
                else:
                    owners.setdefault(alias, model_name)


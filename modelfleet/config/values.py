"""Checking one value of the fleet file: types, ranges, choices, `${VAR}`s, every problem kept.

A ValueReader collects problems instead of raising, so one run reports every
problem of a file at once; the section walk (reader.py) is built on it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from ruamel.yaml.scalarbool import ScalarBoolean

from modelfleet.config.schema import MASK, is_secret
from modelfleet.config.source import line_of_item, line_of_key
from modelfleet.errors import ConfigProblem

VAR_REF = re.compile(r"\$\{([^{}]*)\}")
_VAR_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_MAX_VALUE_DEPTH = 16  # backend_args values may nest (JSON-ish flags); anchors may even loop


class _Invalid:
    """Marks a value that already produced a problem (the caller skips it)."""


INVALID: Any = _Invalid()


class Deferred(str):
    """A string with `${VAR}`s left unresolved (structure-only check): type checks skip it."""


def is_bool(value: Any) -> bool:
    return isinstance(value, (bool, ScalarBoolean))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not is_bool(value)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and not is_bool(value)


def type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if is_bool(value):
        return "true/false"
    if is_int(value):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__} value"


def shown(value: Any, path: str) -> str:
    """A value as a message may echo it: never a secret, never a novel."""
    if is_secret(path):
        return MASK
    if is_bool(value):
        return "true" if value else "false"
    if isinstance(value, str):
        text = str(value)
        return repr(text if len(text) <= 40 else text[:37] + "...")
    if is_number(value):
        return str(value)
    return type_name(value)


class ValueReader:
    """Checks values one by one, collecting every problem with its file, line and key path."""

    def __init__(self, filename: str, resolve_env: bool) -> None:
        self.filename = filename
        self.resolve_env = resolve_env
        self.problems: list[ConfigProblem] = []

    def problem(self, line: int | None, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.filename, line, path, message))

    # ---- generic pieces ------------------------------------------------------------------

    def mapping(self, node: Any, path: str, line: int | None, known: Sequence[str],
                required: Sequence[str] = ()) -> dict[str, tuple[Any, int | None]] | None:
        """The known keys of a mapping with their lines; unknown keys become problems."""
        if not isinstance(node, dict):
            self.problem(line, path, f"must be a mapping (key: value lines), got {type_name(node)}")
            return None
        entries: dict[str, tuple[Any, int | None]] = {}
        for key, value in node.items():
            key_line = line_of_key(node, key, line)
            if not isinstance(key, str):
                self.problem(key_line, path, f"keys must be names (strings), got {shown(key, '')}; "
                             f"known keys: {', '.join(known)}")
                continue
            sub = join(path, key)
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                self.problem(key_line, sub, f"unknown key; {hint}")
                continue
            entries[key] = (value, key_line)
        for key in required:
            if key not in entries:
                self.problem(line, path, f"missing required key {key!r}")
        return entries

    def substitute(self, text: str, path: str, line: int | None, *,
                   unset_ok: bool = False) -> Any:
        """Resolve `${VAR}` / `${VAR:-default}`; `$${` writes a literal `${`.

        Structure-only (resolve_env=False) keeps the text as written and marks it
        deferred, so a file whose variables are unset here can still be checked. With
        `unset_ok`, a variable unset here defers the text too: a value only one program
        uses (the gateway's keys) must not stop every other reader of the file.
        """
        resolved_chunks: list[str] = []
        has_refs = failed = deferred = False
        for chunk in text.split("$${"):
            out: list[str] = []
            pos = 0
            for m in VAR_REF.finditer(chunk):
                out.append(chunk[pos:m.start()])
                pos = m.end()
                body = _VAR_BODY.fullmatch(m.group(1))
                if body is None:
                    ref = "${...}" if is_secret(path) else m.group(0)
                    self.problem(line, path, f"malformed variable reference {ref}; write ${{VAR}} "
                                 "or ${VAR:-default} (and $${ for a literal ${)")
                    failed = True
                    continue
                has_refs = True
                name, default = body.group(1), body.group(2)
                if not self.resolve_env:
                    out.append(m.group(0))
                elif os.environ.get(name):
                    out.append(os.environ[name])
                elif default is not None:  # as in the shell, `:-` also covers a set but empty variable
                    out.append(default)
                elif name in os.environ:
                    out.append("")
                elif unset_ok:
                    deferred = True
                else:
                    self.problem(line, path, f"environment variable {name} is not set; set it, "
                                 f"or give a default as ${{{name}:-default}}")
                    failed = True
            rest = chunk[pos:]
            if "${" in rest:
                self.problem(line, path, "unclosed ${ in value; write ${VAR} or ${VAR:-default}")
                failed = True
            out.append(rest)
            resolved_chunks.append("".join(out))
        if failed:
            return INVALID
        if not self.resolve_env or deferred:
            return Deferred(text) if has_refs else str(text)
        return "${".join(resolved_chunks)

    def scalar(self, value: Any, path: str, line: int | None, kind: str) -> Any:
        """Check one scalar of type kind (str | int | number | bool), after `${VAR}` substitution."""
        substituted = False
        if isinstance(value, str) and "$" in value:
            value = self.substitute(str(value), path, line)
            if value is INVALID or isinstance(value, Deferred):
                return value
            substituted = True
            if kind != "str":
                value = _coerce_env_text(value, kind)
        if kind == "str":
            if isinstance(value, str):
                return str(value)
            expected = "a string"
        elif kind == "int":
            if is_int(value):
                return int(value)
            expected = "an integer"
        elif kind == "number":
            if is_number(value):
                number = float(value)
                if not math.isfinite(number):
                    self.problem(line, path, f"must be a finite number, got {shown(value, path)}")
                    return INVALID
                return number
            expected = "a number"
        else:
            if is_bool(value):
                return bool(value)
            expected = "true or false"
        got = shown(value, path)
        if isinstance(value, str) and not substituted and kind != "str":
            got += " (a string; remove the quotes)" if _coerce_env_text(value, kind) is not value else ""
        via = " after ${VAR} substitution" if substituted else ""
        self.problem(line, path, f"must be {expected}, got {got}{via}")
        return INVALID

    def number(self, value: Any, path: str, line: int | None, *, minimum: float | None = None,
               above: float | None = None, integer: bool = False, maximum: float | None = None) -> Any:
        """A number in range; the message states the range the way a person would write it."""
        result = self.scalar(value, path, line, "int" if integer else "number")
        if result is INVALID or isinstance(result, Deferred):
            return result
        echoed = value if is_number(value) else result
        ok = True
        if above is not None and not result > above:
            ok, rule = False, f"must be greater than {num(above)}"
        elif minimum is not None and maximum is not None and not minimum <= result <= maximum:
            ok, rule = False, f"must be {num(minimum)}..{num(maximum)}"
        elif minimum is not None and not result >= minimum:
            ok, rule = False, f"must be at least {num(minimum)}"
        elif maximum is not None and not result <= maximum:
            ok, rule = False, f"must be at most {num(maximum)}"
        if not ok:
            self.problem(line, path, f"{rule}, got {shown(echoed, path)}")
            return INVALID
        return result

    def delay(self, value: Any, path: str, line: int | None) -> Any:
        """`off`, `auto`, or seconds > 0 (`false` is `off`: YAML 1.1 reads a bare off so)."""
        if is_bool(value) and not value:
            return "off"
        if isinstance(value, str) and "$" in value:
            value = self.substitute(str(value), path, line)
            if value is INVALID or isinstance(value, Deferred):
                return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word in ("off", "auto"):
                return word
            number = _coerce_env_text(value, "number")
            if number is value:
                self.problem(line, path, f"must be off, auto or a number of seconds, got "
                             f"{shown(value, path)}")
                return INVALID
            value = number
        if not is_number(value) or not math.isfinite(float(value)) or value <= 0:
            self.problem(line, path, "must be off, auto or a number of seconds greater than 0, "
                         f"got {shown(value, path)}")
            return INVALID
        return float(value)

    def text(self, value: Any, path: str, line: int | None, *, choices: Sequence[str] = (),
             nonempty: bool = True) -> Any:
        result = self.scalar(value, path, line, "str")
        if result is INVALID or isinstance(result, Deferred):
            return result
        if choices and result not in choices:
            close = difflib.get_close_matches(result, choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problem(line, path, f"must be one of {', '.join(choices)}; got "
                         f"{shown(result, path)}{hint}")
            return INVALID
        if nonempty and not result.strip():
            self.problem(line, path, "must not be empty")
            return INVALID
        return result

    def items(self, node: Any, path: str, line: int | None) -> list[tuple[Any, int | None, str]] | None:
        """A list's items with their lines and paths."""
        if not isinstance(node, list):
            self.problem(line, path, f"must be a list, got {type_name(node)}")
            return None
        return [(item, line_of_item(node, i, line), f"{path}[{i}]") for i, item in enumerate(node)]

    def int_list(self, node: Any, path: str, line: int | None, what: str) -> tuple[int, ...] | Any:
        """gpus / cpus: non-negative, unique integer indexes."""
        entries = self.items(node, path, line)
        if entries is None:
            return INVALID
        result: list[int] = []
        for item, item_line, item_path in entries:
            value = self.number(item, item_path, item_line, integer=True, minimum=0)
            if value is INVALID or isinstance(value, Deferred):
                continue
            if value in result:
                self.problem(item_line, item_path, f"{what} {value} is listed twice")
                continue
            result.append(value)
        return tuple(result)

    def plain(self, value: Any, path: str, line: int | None, depth: int = 0) -> Any:
        """A backend_args value as plain Python (scalar, list or mapping)."""
        if depth > _MAX_VALUE_DEPTH:
            self.problem(line, path, "nests too deeply")
            return INVALID
        if value is None:
            self.problem(line, path, "has no value; use true for a bare flag, or remove the key")
            return INVALID
        if is_bool(value):
            return bool(value)
        if is_int(value):  # engine flags such as max-model-len must stay integers
            return int(value)
        if is_number(value):
            return self.scalar(value, path, line, "number")
        if isinstance(value, str):
            converted = self.scalar(value, path, line, "str")
            return converted if converted is INVALID else str(converted)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, sub in value.items():
                if not isinstance(key, str):
                    self.problem(line_of_key(value, key, line), path,
                                 f"keys must be strings, got {shown(key, '')}")
                    continue
                converted = self.plain(sub, join(path, key), line_of_key(value, key, line), depth + 1)
                if converted is not INVALID:
                    out[str(key)] = converted
            return out
        if isinstance(value, list):
            converted_items = [self.plain(item, f"{path}[{i}]", line_of_item(value, i, line), depth + 1)
                               for i, item in enumerate(value)]
            return [v for v in converted_items if v is not INVALID]
        self.problem(line, path, f"must be a string, number, true/false, list or mapping, "
                     f"got {type_name(value)}")
        return INVALID


def _coerce_env_text(text: str, kind: str) -> Any:
    """A substituted string read as the scalar the key wants (`port: ${PORT:-8080}`)."""
    stripped = text.strip()
    try:
        if kind == "int":
            return int(stripped)
        if kind == "number":
            return int(stripped) if re.fullmatch(r"[-+]?\d+", stripped) else float(stripped)
    except ValueError:
        return text
    if kind == "bool" and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return text


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)

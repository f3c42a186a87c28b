"""Where the fleet file is and how its YAML is loaded: ruamel's round trip, errors given lines.

One YAML library (ruamel.yaml) reads and edits the file so that every error can
name its line and every edit keeps the user's comments.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from modelfleet.errors import ConfigError, ConfigProblem

DEFAULT_CONFIG_NAME = "client_config.yaml"
CONFIG_ENV_VAR = "MODELFLEET_CONFIG"


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The fleet file: -c FILE, else $MODELFLEET_CONFIG, else ./client_config.yaml.

    A missing file is a ConfigError that says where the name came from and how to
    pick another, because "file not found" alone leaves a newcomer guessing.
    """
    if explicit:
        path, source = Path(explicit), "given with -c"
    elif os.environ.get(CONFIG_ENV_VAR):
        path, source = Path(os.environ[CONFIG_ENV_VAR]), f"from ${CONFIG_ENV_VAR}"
    else:
        path, source = Path(DEFAULT_CONFIG_NAME), "the default, in the current directory"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError([ConfigProblem(
            str(path), None, "",
            f"fleet file {what} ({source}); pass -c FILE or set ${CONFIG_ENV_VAR} "
            f"to the fleet file you mean",
        )])
    return path


def read_text(path: Path) -> str:
    """The file's text, or a ConfigError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError([ConfigProblem(str(path), None, "", f"cannot read the fleet file: {reason}")]) from None


def round_trip_yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a user's long line
    return yaml


def load_yaml(text: str, filename: str) -> Any:
    """ruamel's round-trip load, with its errors turned into located ConfigProblems."""
    if not isinstance(text, str):
        raise ConfigError([ConfigProblem(filename, None, "", "config text must be a string")])
    try:
        data = round_trip_yaml().load(text)
    except MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(exc, filename, text)]) from None
    except RecursionError:
        raise ConfigError([ConfigProblem(filename, None, "", "YAML nests too deeply")]) from None
    except Exception as exc:  # ruamel raises assorted types (ReaderError, ValueError, ...)
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError([ConfigProblem(filename, None, "", f"not valid YAML: {detail}")]) from None
    if data is None:
        raise ConfigError([ConfigProblem(
            filename, None, "", "the file is empty; it needs at least a `models:` section")])
    return data


def _yaml_problem(exc: MarkedYAMLError, filename: str, text: str) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = str(exc.problem or exc.context or "syntax error")
    duplicate = re.match(r'found duplicate key "(.*?)" with value', problem, re.DOTALL)
    if duplicate:  # ruamel's text echoes both values, which may be secrets
        return ConfigProblem(filename, line, "",
                             f"key {duplicate.group(1)!r} appears twice in one mapping; keep one")
    context = f" ({exc.context})" if exc.context and exc.problem else ""
    source_lines = text.splitlines()
    hint = ""
    if line and line <= len(source_lines) and "${" in source_lines[line - 1] and "flow" in context:
        hint = '; inside {...} or [...] quote values that hold ${VAR}: "${VAR}"'
    return ConfigProblem(filename, line, "", f"YAML syntax error: {problem}{context}{hint}")


def line_of_key(node: Any, key: Any, default: int | None) -> int | None:
    try:
        return int(node.lc.key(key)[0]) + 1
    except Exception:  # merged keys (<<: *anchor) and plain dicts carry no position
        return default


def line_of_item(node: Any, index: int, default: int | None) -> int | None:
    try:
        return int(node.lc.item(index)[0]) + 1
    except Exception:
        return default


def line_of_node(node: Any, default: int | None) -> int | None:
    try:
        return int(node.lc.line) + 1
    except Exception:
        return default



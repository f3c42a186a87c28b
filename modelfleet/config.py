"""The fleet file: parsed, checked strictly, and edited, all through this module.

One YAML library (ruamel.yaml) reads and edits the file so that every error can
name its line and every edit keeps the user's comments. Everything else in
modelfleet sees only the frozen dataclasses below.

INTERFACE CONTRACT (other modules rely on these names):
  load_config(path=None, *, resolve_env=True) -> FleetConfig   (raises only ConfigError)
  find_config_path(explicit: str | Path | None) -> Path   (-c, $MODELFLEET_CONFIG, ./client_config.yaml)
  parse_config(text: str, filename: str, *, resolve_env=True) -> FleetConfig
  reload_config(config) -> FleetConfig      (the launcher's SIGHUP: read config.path again)
  fleet_to_dict(config) -> dict             (defaults filled in, secrets masked: `config show`)
  ConfigDocument.open(path)                 (edit: get / set / add_server / remove_server /
                                             add_model / remove_model, then save())

With resolve_env=False (a structure-only check, for editing) `${VAR}`s stay as
written: string fields hold the reference itself and numeric fields whose value
is a reference keep their default (a port holds the text), so such a config is
for checking, not running.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, MarkedYAMLError
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.tokens import CommentToken

from modelfleet.errors import ConfigError, ConfigProblem, UsageError

POLICIES = ("peak_ewma", "fastest", "least_loaded", "round_robin", "random")
BACKENDS = ("vllm", "sglang", "sim")
KINDS = ("chat", "embedding")
DEVICES = ("gpu", "cpu")


@dataclass(frozen=True)
class RoutingSpec:
    """How the client picks servers and when it gives up on one."""

    policy: str = "peak_ewma"
    latency_growing_rate: float = 2.0
    max_retry: int = 5
    request_timeout_s: float = 600.0
    probe_interval_s: float = 5.0
    stall_timeout_s: float = 5.0
    # Retries allowed as a fraction of recent requests (Finagle's RetryBudget), plus a
    # small per-second floor so a quiet client can still retry.
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0


@dataclass(frozen=True)
class BenchmarkSpec:
    """What background probes send: kept tiny so probing costs the fleet nothing."""

    messages: tuple[Mapping[str, str], ...] = ({"role": "user", "content": "Say OK."},)
    embedding_input: str = "benchmark sentence"
    max_tokens: int = 8


@dataclass(frozen=True)
class SimSpec:
    """Settings of the simulated engine (backend `sim`); mirrors `modelfleet sim` flags."""

    speed: float = 1.0
    batch_slowdown: float = 0.02
    dim: int = 384
    max_batch: int = 64
    seed: int = 0


@dataclass(frozen=True)
class ServerSpec:
    """One server of a model. Only host and port matter to the client; the rest to the launcher."""

    host: str
    port: int
    gpus: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()
    min_free_memory_gb: float | None = None
    sim: SimSpec | None = None  # per-server override of the model's sim settings
    line: int | None = None  # where it stands in the file, for messages

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class ModelSpec:
    """A model and every server that serves it."""

    name: str
    servers: tuple[ServerSpec, ...]
    kind: str = "chat"
    aliases: tuple[str, ...] = ()
    model_path: str | None = None  # what the engine loads; defaults to the name
    served_name: str = ""  # the `model` on the wire; defaults to the name
    backend: str = "vllm"
    api_key: str | None = field(default=None, repr=False)  # never printed
    backend_args: Mapping[str, Any] = field(default_factory=dict)
    sim: SimSpec = SimSpec()
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for the engine
    python: str | None = None  # interpreter that runs the engine as `python -m <module>`
    command: tuple[str, ...] | None = None  # full argv override for the engine
    device: str = "gpu"  # gpu | cpu: cpu skips NVML entirely

    @property
    def wire_name(self) -> str:
        return self.served_name or self.name

    def sim_for(self, server: ServerSpec) -> SimSpec:
        return server.sim or self.sim


@dataclass(frozen=True)
class FleetConfig:
    """The whole fleet, as read from one file."""

    models: Mapping[str, ModelSpec]
    routing: RoutingSpec = RoutingSpec()
    benchmark: BenchmarkSpec = BenchmarkSpec()
    path: Path | None = None

    def resolve_model(self, name: str) -> ModelSpec:
        """Find a model by its key or an alias; raises UnknownModel listing the known names."""
        from modelfleet.errors import UnknownModel

        if name in self.models:
            return self.models[name]
        for spec in self.models.values():
            if name in spec.aliases:
                return spec
        raise UnknownModel(name, list(self.models))


# --------------------------------------------------------------------------------------------
# Reading: find the file, parse it with ruamel.yaml, check every key, collect every problem.
# --------------------------------------------------------------------------------------------

DEFAULT_CONFIG_NAME = "client_config.yaml"
CONFIG_ENV_VAR = "MODELFLEET_CONFIG"
SECRET_KEYS = frozenset({"api_key"})
MASK = "***"

TOP_KEYS = ("routing", "benchmark", "models")
ROUTING_KEYS = tuple(f.name for f in fields(RoutingSpec))
BENCHMARK_KEYS = tuple(f.name for f in fields(BenchmarkSpec))
SIM_KEYS = tuple(f.name for f in fields(SimSpec))
MODEL_KEYS = (
    "kind", "aliases", "model_path", "served_name", "backend", "api_key", "backend_args",
    "sim", "env", "python", "command", "device", "servers",
)
SERVER_KEYS = ("host", "port", "gpus", "cpus", "min_free_memory_gb", "sim")
MESSAGE_KEYS = ("role", "content")

_VAR_REF = re.compile(r"\$\{([^{}]*)\}")
_VAR_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_VALUE_DEPTH = 16  # backend_args values may nest (JSON-ish flags); anchors may even loop


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


def load_config(path: str | os.PathLike[str] | None = None, *, resolve_env: bool = True) -> FleetConfig:
    """Read and check the fleet file; raises ConfigError listing every problem in it.

    With resolve_env=False the `${VAR}`s are left as written and need not be set
    (a structure-only check, as editing needs on a machine without the secrets).
    """
    found = find_config_path(path)
    try:
        text = found.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError([ConfigProblem(str(found), None, "", f"cannot read the fleet file: {reason}")]) from None
    cfg = parse_config(text, str(found), resolve_env=resolve_env)
    return replace(cfg, path=found)


def reload_config(config: FleetConfig, *, resolve_env: bool = True) -> FleetConfig:
    """Read the file a config came from again (the launcher's SIGHUP)."""
    return load_config(config.path, resolve_env=resolve_env)


def parse_config(text: str, filename: str = "<config>", *, resolve_env: bool = True) -> FleetConfig:
    """Parse and check fleet-file text; never raises anything but ConfigError."""
    data = _load_yaml(text, filename)
    reader = _Reader(filename, resolve_env)
    cfg = reader.fleet(data)
    if reader.problems or cfg is None:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line or 0) or [ConfigProblem(filename, None, "", "invalid config")])
    return cfg


def _round_trip_yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a user's long line
    return yaml


def _load_yaml(text: str, filename: str) -> Any:
    """ruamel's round-trip load, with its errors turned into located ConfigProblems."""
    if not isinstance(text, str):
        raise ConfigError([ConfigProblem(filename, None, "", "config text must be a string")])
    try:
        data = _round_trip_yaml().load(text)
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


class _Invalid:
    """Marks a value that already produced a problem (the caller skips it)."""


INVALID: Any = _Invalid()


class _Deferred(str):
    """A string with `${VAR}`s left unresolved (structure-only check): type checks skip it."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, ScalarBoolean))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not _is_bool(value)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not _is_bool(value)


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if _is_bool(value):
        return "true/false"
    if _is_int(value):
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


_SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def _is_secret(path: str) -> bool:
    """api_key anywhere, and engine env variables whose names say they hold a credential."""
    parts = path.split(".")
    return parts[-1] in SECRET_KEYS or (len(parts) >= 2 and parts[-2] == "env"
                                        and bool(_SECRET_ENV_NAME.search(parts[-1])))


def _shown(value: Any, path: str) -> str:
    """A value as a message may echo it: never a secret, never a novel."""
    if _is_secret(path):
        return MASK
    if _is_bool(value):
        return "true" if value else "false"
    if isinstance(value, str):
        text = str(value)
        return repr(text if len(text) <= 40 else text[:37] + "...")
    if _is_number(value):
        return str(value)
    return _type_name(value)


def _line_of_key(node: Any, key: Any, default: int | None) -> int | None:
    try:
        return int(node.lc.key(key)[0]) + 1
    except Exception:  # merged keys (<<: *anchor) and plain dicts carry no position
        return default


def _line_of_item(node: Any, index: int, default: int | None) -> int | None:
    try:
        return int(node.lc.item(index)[0]) + 1
    except Exception:
        return default


def _line_of_node(node: Any, default: int | None) -> int | None:
    try:
        return int(node.lc.line) + 1
    except Exception:
        return default


class _Reader:
    """Walks the parsed YAML once, building dataclasses and collecting every problem."""

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
            self.problem(line, path, f"must be a mapping (key: value lines), got {_type_name(node)}")
            return None
        entries: dict[str, tuple[Any, int | None]] = {}
        for key, value in node.items():
            key_line = _line_of_key(node, key, line)
            if not isinstance(key, str):
                self.problem(key_line, path, f"keys must be names (strings), got {_shown(key, '')}; "
                             f"known keys: {', '.join(known)}")
                continue
            sub = _join(path, key)
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

    def substitute(self, text: str, path: str, line: int | None) -> Any:
        """Resolve `${VAR}` / `${VAR:-default}`; `$${` writes a literal `${`.

        Structure-only (resolve_env=False) keeps the text as written and marks it
        deferred, so a file whose variables are unset here can still be checked.
        """
        resolved_chunks: list[str] = []
        has_refs = failed = False
        for chunk in text.split("$${"):
            out: list[str] = []
            pos = 0
            for m in _VAR_REF.finditer(chunk):
                out.append(chunk[pos:m.start()])
                pos = m.end()
                body = _VAR_BODY.fullmatch(m.group(1))
                if body is None:
                    ref = "${...}" if _is_secret(path) else m.group(0)
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
        if not self.resolve_env:
            return _Deferred(text) if has_refs else str(text)
        return "${".join(resolved_chunks)

    def scalar(self, value: Any, path: str, line: int | None, kind: str) -> Any:
        """Check one scalar of type kind (str | int | number | bool), after `${VAR}` substitution."""
        substituted = False
        if isinstance(value, str) and "$" in value:
            value = self.substitute(str(value), path, line)
            if value is INVALID or isinstance(value, _Deferred):
                return value
            substituted = True
            if kind != "str":
                value = _coerce_env_text(value, kind)
        if kind == "str":
            if isinstance(value, str):
                return str(value)
            expected = "a string"
        elif kind == "int":
            if _is_int(value):
                return int(value)
            expected = "an integer"
        elif kind == "number":
            if _is_number(value):
                number = float(value)
                if not math.isfinite(number):
                    self.problem(line, path, f"must be a finite number, got {_shown(value, path)}")
                    return INVALID
                return number
            expected = "a number"
        else:
            if _is_bool(value):
                return bool(value)
            expected = "true or false"
        got = _shown(value, path)
        if isinstance(value, str) and not substituted and kind != "str":
            got += " (a string; remove the quotes)" if _coerce_env_text(value, kind) is not value else ""
        via = " after ${VAR} substitution" if substituted else ""
        self.problem(line, path, f"must be {expected}, got {got}{via}")
        return INVALID

    def number(self, value: Any, path: str, line: int | None, *, minimum: float | None = None,
               above: float | None = None, integer: bool = False, maximum: float | None = None) -> Any:
        """A number in range; the message states the range the way a person would write it."""
        result = self.scalar(value, path, line, "int" if integer else "number")
        if result is INVALID or isinstance(result, _Deferred):
            return result
        shown = value if _is_number(value) else result
        ok = True
        if above is not None and not result > above:
            ok, rule = False, f"must be greater than {_num(above)}"
        elif minimum is not None and maximum is not None and not minimum <= result <= maximum:
            ok, rule = False, f"must be {_num(minimum)}..{_num(maximum)}"
        elif minimum is not None and not result >= minimum:
            ok, rule = False, f"must be at least {_num(minimum)}"
        elif maximum is not None and not result <= maximum:
            ok, rule = False, f"must be at most {_num(maximum)}"
        if not ok:
            self.problem(line, path, f"{rule}, got {_shown(shown, path)}")
            return INVALID
        return result

    def text(self, value: Any, path: str, line: int | None, *, choices: Sequence[str] = (),
             nonempty: bool = True) -> Any:
        result = self.scalar(value, path, line, "str")
        if result is INVALID or isinstance(result, _Deferred):
            return result
        if choices and result not in choices:
            close = difflib.get_close_matches(result, choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problem(line, path, f"must be one of {', '.join(choices)}; got "
                         f"{_shown(result, path)}{hint}")
            return INVALID
        if nonempty and not result.strip():
            self.problem(line, path, "must not be empty")
            return INVALID
        return result

    def items(self, node: Any, path: str, line: int | None) -> list[tuple[Any, int | None, str]] | None:
        """A list's items with their lines and paths."""
        if not isinstance(node, list):
            self.problem(line, path, f"must be a list, got {_type_name(node)}")
            return None
        return [(item, _line_of_item(node, i, line), f"{path}[{i}]") for i, item in enumerate(node)]

    def int_list(self, node: Any, path: str, line: int | None, what: str) -> tuple[int, ...] | Any:
        """gpus / cpus: non-negative, unique integer indexes."""
        entries = self.items(node, path, line)
        if entries is None:
            return INVALID
        result: list[int] = []
        for item, item_line, item_path in entries:
            value = self.number(item, item_path, item_line, integer=True, minimum=0)
            if value is INVALID or isinstance(value, _Deferred):
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
        if _is_bool(value):
            return bool(value)
        if _is_int(value):  # engine flags such as max-model-len must stay integers
            return int(value)
        if _is_number(value):
            return self.scalar(value, path, line, "number")
        if isinstance(value, str):
            converted = self.scalar(value, path, line, "str")
            return converted if converted is INVALID else str(converted)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, sub in value.items():
                if not isinstance(key, str):
                    self.problem(_line_of_key(value, key, line), path,
                                 f"keys must be strings, got {_shown(key, '')}")
                    continue
                converted = self.plain(sub, _join(path, key), _line_of_key(value, key, line), depth + 1)
                if converted is not INVALID:
                    out[str(key)] = converted
            return out
        if isinstance(value, list):
            converted_items = [self.plain(item, f"{path}[{i}]", _line_of_item(value, i, line), depth + 1)
                               for i, item in enumerate(value)]
            return [v for v in converted_items if v is not INVALID]
        self.problem(line, path, f"must be a string, number, true/false, list or mapping, "
                     f"got {_type_name(value)}")
        return INVALID

    # ---- sections ------------------------------------------------------------------------

    def fleet(self, data: Any) -> FleetConfig | None:
        if not isinstance(data, dict):
            self.problem(_line_of_node(data, 1), "", f"the top level must be a mapping with "
                         f"routing:, benchmark: and models:, got {_type_name(data)}")
            return None
        entries = self.mapping(data, "", 1, TOP_KEYS)
        if entries is None:
            return None
        routing = self.routing(*entries["routing"]) if "routing" in entries else RoutingSpec()
        benchmark = self.benchmark(*entries["benchmark"]) if "benchmark" in entries else BenchmarkSpec()
        if "models" not in entries:
            self.problem(1, "models", "missing: the fleet file needs a `models:` section "
                         "listing each model and its servers")
            return None
        models = self.models(*entries["models"])
        if self.problems or models is None:
            return None
        return FleetConfig(models=models, routing=routing, benchmark=benchmark)

    def routing(self, node: Any, line: int | None) -> RoutingSpec:
        entries = self.mapping(node, "routing", line, ROUTING_KEYS)
        if not entries:
            return RoutingSpec()
        values: dict[str, Any] = {}
        checks: dict[str, dict[str, Any]] = {
            "latency_growing_rate": {"above": 1},
            "max_retry": {"integer": True, "minimum": 1},
            "request_timeout_s": {"above": 0},
            "probe_interval_s": {"above": 0},
            "stall_timeout_s": {"above": 0},
            "retry_budget_ratio": {"minimum": 0},
            "retry_budget_min_per_s": {"minimum": 0},
        }
        for key, (value, key_line) in entries.items():
            path = f"routing.{key}"
            if key == "policy":
                values[key] = self.text(value, path, key_line, choices=POLICIES)
            else:
                values[key] = self.number(value, path, key_line, **checks[key])
        good = _numbers(values)
        spec = replace(RoutingSpec(), **good)
        if ("stall_timeout_s" in good or "request_timeout_s" in good) and \
                spec.stall_timeout_s > spec.request_timeout_s:
            key = "stall_timeout_s" if "stall_timeout_s" in good else "request_timeout_s"
            self.problem(entries[key][1], f"routing.{key}", f"stall_timeout_s ({_num(spec.stall_timeout_s)}) "
                         f"must not exceed request_timeout_s ({_num(spec.request_timeout_s)})")
        if isinstance(values.get("policy"), _Deferred):
            good["policy"] = str(values["policy"])
        return replace(RoutingSpec(), **good)

    def benchmark(self, node: Any, line: int | None) -> BenchmarkSpec:
        entries = self.mapping(node, "benchmark", line, BENCHMARK_KEYS)
        if not entries:
            return BenchmarkSpec()
        values: dict[str, Any] = {}
        if "messages" in entries:
            values["messages"] = self.messages(*entries["messages"])
        if "embedding_input" in entries:
            value, key_line = entries["embedding_input"]
            values["embedding_input"] = self.text(value, "benchmark.embedding_input", key_line)
        if "max_tokens" in entries:
            value, key_line = entries["max_tokens"]
            values["max_tokens"] = self.number(value, "benchmark.max_tokens", key_line, integer=True, minimum=1)
        return replace(BenchmarkSpec(), **_known(values))

    def messages(self, node: Any, line: int | None) -> Any:
        entries = self.items(node, "benchmark.messages", line)
        if entries is None:
            return INVALID
        if not entries:
            self.problem(line, "benchmark.messages", "must hold at least one message, "
                         "e.g. [{role: user, content: \"Say OK.\"}]")
            return INVALID
        result = []
        for item, item_line, item_path in entries:
            fields_ = self.mapping(item, item_path, item_line, MESSAGE_KEYS, required=MESSAGE_KEYS)
            if fields_ is None:
                continue
            message = {key: self.text(value, _join(item_path, key), key_line, nonempty=key == "role")
                       for key, (value, key_line) in fields_.items()}
            if INVALID not in message.values():
                result.append(message)
        return tuple(result)

    def sim(self, node: Any, path: str, line: int | None) -> dict[str, Any] | None:
        entries = self.mapping(node, path, line, SIM_KEYS)
        if entries is None:
            return None
        checks: dict[str, dict[str, Any]] = {
            "speed": {"above": 0},
            "batch_slowdown": {"minimum": 0},
            "dim": {"integer": True, "minimum": 1},
            "max_batch": {"integer": True, "minimum": 1},
            "seed": {"integer": True},
        }
        values = {key: self.number(value, _join(path, key), key_line, **checks[key])
                  for key, (value, key_line) in entries.items()}
        return {k: v for k, v in values.items() if v is not INVALID}

    def models(self, node: Any, line: int | None) -> dict[str, ModelSpec] | None:
        if not isinstance(node, dict):
            self.problem(line, "models", f"must be a mapping of model name to its settings, "
                         f"got {_type_name(node)}")
            return None
        if not node:
            self.problem(line, "models", "lists no models; add at least one with its servers")
            return None
        seen_servers: dict[tuple[str, Any], tuple[str, int | None]] = {}
        models: dict[str, ModelSpec] = {}
        alias_lines: dict[str, list[tuple[str, int | None, str]]] = {}
        for name, body in node.items():
            key_line = _line_of_key(node, name, line)
            if not isinstance(name, str) or not name.strip():
                quote = f'; quote it: "{name}":' if isinstance(name, (int, float)) else ""
                self.problem(key_line, "models", f"model names must be non-empty strings, got "
                             f"{_shown(name, '')}{quote}")
                continue
            spec = self.model(str(name), body, key_line, seen_servers, alias_lines)
            if spec is not None:
                models[str(name)] = spec
        names = {str(n) for n in node if isinstance(n, str)}
        owners: dict[str, str] = {}
        for model_name, aliases in alias_lines.items():
            for alias, alias_line, alias_path in aliases:
                if alias in names:
                    self.problem(alias_line, alias_path, f"alias {alias!r} is also the name of a model; "
                                 "an alias must name one model only")
                elif alias in owners and owners[alias] != model_name:
                    self.problem(alias_line, alias_path, f"alias {alias!r} is also an alias of model "
                                 f"{owners[alias]!r}; an alias must name one model only")
                else:
                    owners.setdefault(alias, model_name)
        return models

    def model(self, name: str, node: Any, line: int | None,
              seen_servers: dict[tuple[str, Any], tuple[str, int | None]],
              alias_lines: dict[str, list[tuple[str, int | None, str]]]) -> ModelSpec | None:
        path = f"models.{name}"
        entries = self.mapping(node, path, line, MODEL_KEYS, required=("servers",))
        if entries is None:
            return None
        before = len(self.problems)
        values: dict[str, Any] = {}
        for key in ("kind", "backend", "device"):
            if key in entries:
                choices = {"kind": KINDS, "backend": BACKENDS, "device": DEVICES}[key]
                values[key] = self.text(entries[key][0], f"{path}.{key}", entries[key][1], choices=choices)
        for key in ("model_path", "served_name", "python"):
            if key in entries:
                values[key] = self.text(entries[key][0], f"{path}.{key}", entries[key][1])
        if "api_key" in entries:  # empty means none, so `${KEY:-}` makes a key optional
            api_key = self.text(entries["api_key"][0], f"{path}.api_key", entries["api_key"][1], nonempty=False)
            values["api_key"] = api_key if api_key != "" else None
        if "aliases" in entries:
            values["aliases"] = self.aliases(name, *entries["aliases"], alias_lines)
        if "backend_args" in entries:
            values["backend_args"] = self.backend_args(*entries["backend_args"], f"{path}.backend_args")
        if "env" in entries:
            values["env"] = self.env(*entries["env"], f"{path}.env")
        if "command" in entries:
            values["command"] = self.command(*entries["command"], f"{path}.command")
            if "python" in entries:
                self.problem(entries["python"][1], f"{path}.python", "give either command (the full "
                             "argv) or python (the interpreter), not both")
        model_sim = SimSpec()
        if "sim" in entries:
            sim_values = self.sim(*entries["sim"][:1], f"{path}.sim", entries["sim"][1])
            if sim_values is not None:
                model_sim = replace(model_sim, **_numbers(sim_values))
        device = values.get("device", "gpu")
        servers: list[ServerSpec] = []
        if "servers" in entries:
            node_servers, servers_line = entries["servers"]
            items = self.items(node_servers, f"{path}.servers", servers_line)
            if items is not None and not items:
                self.problem(servers_line, f"{path}.servers", "lists no servers; a model needs at "
                             "least one, e.g. - {host: 127.0.0.1, port: 8000}")
            for item, item_line, item_path in items or []:
                server = self.server(item, item_path, item_line, model_sim, device, seen_servers)
                if server is not None:
                    servers.append(server)
        if len(self.problems) > before:
            return None
        good = _known(values)
        return ModelSpec(
            name=name,
            servers=tuple(servers),
            kind=good.get("kind", "chat"),
            aliases=good.get("aliases", ()),
            model_path=good.get("model_path", name),
            served_name=good.get("served_name", name),
            backend=good.get("backend", "vllm"),
            api_key=good.get("api_key"),
            backend_args=good.get("backend_args", {}),
            sim=model_sim,
            env=good.get("env", {}),
            python=good.get("python"),
            command=good.get("command"),
            device=str(device) if device is not INVALID else "gpu",
        )

    def aliases(self, model: str, node: Any, line: int | None,
                alias_lines: dict[str, list[tuple[str, int | None, str]]]) -> Any:
        path = f"models.{model}.aliases"
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
            alias_lines.setdefault(model, []).append((alias, item_line, item_path))
        return tuple(result)

    def backend_args(self, node: Any, line: int | None, path: str) -> Any:
        if not isinstance(node, dict):
            self.problem(line, path, f"must be a mapping of engine flag to value (e.g. "
                         f"{{max-model-len: 32768}}), got {_type_name(node)}")
            return INVALID
        result: dict[str, Any] = {}
        for key, value in node.items():
            key_line = _line_of_key(node, key, line)
            if not isinstance(key, str) or not key.strip():
                self.problem(key_line, path, f"flag names must be strings, got {_shown(key, '')}")
                continue
            if key.startswith("-"):
                self.problem(key_line, _join(path, key), f"write the flag without dashes: "
                             f"{key.lstrip('-')!r}")
                continue
            converted = self.plain(value, _join(path, key), key_line)
            if converted is not INVALID:
                result[str(key)] = converted
        return result

    def env(self, node: Any, line: int | None, path: str) -> Any:
        if not isinstance(node, dict):
            self.problem(line, path, f"must be a mapping of variable name to value, got {_type_name(node)}")
            return INVALID
        result: dict[str, str] = {}
        for key, value in node.items():
            key_line = _line_of_key(node, key, line)
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                self.problem(key_line, path, f"environment variable names are letters, digits and _, "
                             f"got {_shown(key, '')}")
                continue
            sub = _join(path, key)
            if _is_number(value):
                value = str(value)
            elif not isinstance(value, str):
                self.problem(key_line, sub, f"must be a string (quote it), got {_type_name(value)}")
                continue
            converted = self.scalar(value, sub, key_line, "str")
            if converted is not INVALID:
                result[str(key)] = str(converted)
        return result

    def command(self, node: Any, line: int | None, path: str) -> Any:
        entries = self.items(node, path, line)
        if entries is None:
            return INVALID
        if not entries:
            self.problem(line, path, "must list the program and its arguments, e.g. "
                         "[python, -m, vllm.entrypoints.openai.api_server]")
            return INVALID
        argv = [self.scalar(item, item_path, item_line, "str") for item, item_line, item_path in entries]
        return INVALID if INVALID in argv else tuple(argv)

    def server(self, node: Any, path: str, line: int | None, model_sim: SimSpec, device: Any,
               seen: dict[tuple[str, Any], tuple[str, int | None]]) -> ServerSpec | None:
        entries = self.mapping(node, path, line, SERVER_KEYS, required=("host", "port"))
        if entries is None:
            return None
        before = len(self.problems)
        host = port = INVALID
        if "host" in entries:
            value, key_line = entries["host"]
            host = self.text(value, f"{path}.host", key_line)
            if isinstance(host, str) and not isinstance(host, _Deferred) and \
                    ("://" in host or "/" in host or " " in host.strip()):
                self.problem(key_line, f"{path}.host", f"write the host name or address only "
                             f"(e.g. 10.0.0.3), got {_shown(host, '')}")
                host = INVALID
        if "port" in entries:
            value, key_line = entries["port"]
            port = self.number(value, f"{path}.port", key_line, integer=True, minimum=1, maximum=65535)
        gpus: Any = ()
        cpus: Any = ()
        if "gpus" in entries:
            gpus = self.int_list(*entries["gpus"][:1], f"{path}.gpus", entries["gpus"][1], "GPU")
            if device == "cpu" and gpus:
                self.problem(entries["gpus"][1], f"{path}.gpus", "the model runs on the CPU "
                             "(device: cpu); remove gpus or set device: gpu")
        if "cpus" in entries:
            cpus = self.int_list(*entries["cpus"][:1], f"{path}.cpus", entries["cpus"][1], "CPU")
        min_free: Any = None
        if "min_free_memory_gb" in entries:
            value, key_line = entries["min_free_memory_gb"]
            min_free = self.number(value, f"{path}.min_free_memory_gb", key_line, above=0)
        sim: SimSpec | None = None
        if "sim" in entries:
            sim_values = self.sim(*entries["sim"][:1], f"{path}.sim", entries["sim"][1])
            if sim_values is not None:
                sim = replace(model_sim, **_numbers(sim_values))
        if host is not INVALID and port is not INVALID:
            key = (str(host).lower(), port)
            port_line = entries["port"][1]
            if key in seen:
                other_path, other_line = seen[key]
                where = f" (line {other_line})" if other_line else ""
                self.problem(port_line, path, f"{host}:{port} is already used by {other_path}{where}; "
                             "each server needs its own host:port")
            else:
                seen[key] = (path, port_line)
        if len(self.problems) > before:
            return None
        return ServerSpec(host=str(host), port=port if _is_int(port) else str(port), gpus=gpus, cpus=cpus,
                          min_free_memory_gb=min_free if not isinstance(min_free, _Deferred) else None,
                          sim=sim, line=line)


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


def _known(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values that passed their checks; unresolved `${VAR}` strings stay as written."""
    return {k: (str(v) if isinstance(v, _Deferred) else v) for k, v in values.items() if v is not INVALID}


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers that passed their checks; an unresolved `${VAR}` leaves the default."""
    return {k: v for k, v in values.items() if v is not INVALID and not isinstance(v, _Deferred)}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------------------------
# Showing: the resolved config as plain data, secrets masked.
# --------------------------------------------------------------------------------------------

def fleet_to_dict(config: FleetConfig, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The config with every default filled in, as `config show` prints it.

    Secrets (api_key, and env values whose names look like tokens) become `***`
    unless mask_secrets is False, which nothing that prints should ever pass.
    """
    def sim_dict(sim: SimSpec) -> dict[str, Any]:
        return {f.name: getattr(sim, f.name) for f in fields(SimSpec)}

    models: dict[str, Any] = {}
    for name, spec in config.models.items():
        entry: dict[str, Any] = {
            "kind": spec.kind,
            "aliases": list(spec.aliases),
            "model_path": spec.model_path or spec.name,
            "served_name": spec.wire_name,
            "backend": spec.backend,
            "device": spec.device,
        }
        if spec.api_key is not None:
            entry["api_key"] = MASK if mask_secrets else spec.api_key
        if spec.backend_args:
            entry["backend_args"] = dict(spec.backend_args)
        if spec.backend == "sim":
            entry["sim"] = sim_dict(spec.sim)
        if spec.env:
            entry["env"] = {k: (MASK if mask_secrets and _SECRET_ENV_NAME.search(k) else v)
                            for k, v in spec.env.items()}
        if spec.python:
            entry["python"] = spec.python
        if spec.command:
            entry["command"] = list(spec.command)
        servers = []
        for server in spec.servers:
            item: dict[str, Any] = {"host": server.host, "port": server.port}
            if server.gpus:
                item["gpus"] = list(server.gpus)
            if server.cpus:
                item["cpus"] = list(server.cpus)
            if server.min_free_memory_gb is not None:
                item["min_free_memory_gb"] = server.min_free_memory_gb
            if server.sim is not None:
                item["sim"] = sim_dict(server.sim)
            servers.append(item)
        entry["servers"] = servers
        models[name] = entry
    routing = {f.name: getattr(config.routing, f.name) for f in fields(RoutingSpec)}
    benchmark = {
        "messages": [dict(m) for m in config.benchmark.messages],
        "embedding_input": config.benchmark.embedding_input,
        "max_tokens": config.benchmark.max_tokens,
    }
    return {"routing": routing, "benchmark": benchmark, "models": models}


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
        return {k: mask_secrets(v, _join(path, str(k))) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [mask_secrets(v, path) for v in data]
    if _is_secret(path) and data is not None and not _only_var_refs(data):
        return MASK
    return data


def _only_var_refs(value: Any) -> bool:
    """`${FLEET_API_KEY}` names where a secret comes from without being one."""
    return isinstance(value, str) and bool(value.strip()) and not _VAR_REF.sub("", value).strip()


# --------------------------------------------------------------------------------------------
# Editing: change the file by command, keeping comments, order and layout.
# --------------------------------------------------------------------------------------------

# Paths (model names as *, list indexes as []) where `set` may create a missing mapping.
_CREATABLE = frozenset({
    "routing", "benchmark", "models", "models.*.sim", "models.*.backend_args",
    "models.*.env", "models.*.servers[].sim",
})


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
        self._yaml = _round_trip_yaml()
        mapping, sequence, offset = _guess_indent(text)
        self._yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        data = _load_yaml(text, str(path))
        if not isinstance(data, CommentedMap):
            raise ConfigError([ConfigProblem(str(path), _line_of_node(data, 1), "",
                                             f"the top level must be a mapping, got {_type_name(data)}")])
        self.data: CommentedMap = data

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> ConfigDocument:
        found = find_config_path(path)
        try:
            text = found.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ConfigError([ConfigProblem(str(found), None, "",
                                             f"cannot read the fleet file: {reason}")]) from None
        return cls(text, found)

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
                _append(node, last, value)
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
            _append(node, tokens[depth], chain)

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
        if not servers or _is_flow(servers[-1]):
            item.fa.set_flow_style()
        _append(servers, None, item)

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
        _remove_entry(servers, matches[0])

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
        trailing = _take_trailing(models, _last_key(models)) if models else ""
        models[name] = entry
        if len(models) > 1 and trailing.startswith("\n"):  # models are set apart by blank lines
            _put_trailing(models, list(models)[-2], "\n")
        _put_trailing(models, name, trailing)

    def remove_model(self, name: str) -> None:
        models = self._models()
        key = self._model_key(name)
        if len(models) == 1:
            raise UsageError(f"{key} is the only model; a fleet file needs at least one")
        _remove_entry(models, key)

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
            _atomic_write(self.path, text)
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
        out = f"{out}[{token}]" if isinstance(token, int) else _join(out, token)
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
    known = {"": TOP_KEYS, "routing": ROUTING_KEYS, "benchmark": BENCHMARK_KEYS,
             "models.*": MODEL_KEYS, "models.*.servers[]": SERVER_KEYS}.get(parent, ())
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
        value = _round_trip_yaml().load(value_text)
    except Exception:
        raise UsageError(f"{value_text!r} is not a YAML value; quote strings that hold "
                         "special characters, e.g. '\"a: b\"'") from None
    if isinstance(value, (CommentedMap, CommentedSeq)) and not value.fa.flow_style():
        value.fa.set_flow_style()
    return value


def _spellings(value: Any) -> set[str]:
    """A host or port as written and as it resolves here (`${HOST:-10.0.0.3}` matches 10.0.0.3)."""
    written = str(value).strip()
    reader = _Reader("", resolve_env=True)
    resolved = reader.substitute(written, "", None) if "$" in written else written
    return {written} | ({str(resolved).strip()} if resolved is not INVALID else set())


def _is_flow(node: Any) -> bool:
    return isinstance(node, (CommentedMap, CommentedSeq)) and bool(node.fa.flow_style())


def _is_block(node: Any) -> bool:
    return isinstance(node, (CommentedMap, CommentedSeq)) and len(node) > 0 and not node.fa.flow_style()


def _slot(container: Any) -> int:
    """Where ruamel keeps the comment after an entry: index 2 for mappings, 0 for lists."""
    return 2 if isinstance(container, dict) else 0


def _last_key(container: Any) -> Any:
    return next(reversed(container)) if isinstance(container, dict) else len(container) - 1


def _token_text(token: Any) -> str:
    value = str(token.value)
    if value.lstrip(" ").startswith("#") and not value.startswith(" "):
        column = getattr(getattr(token, "start_mark", None), "column", 0) or 0
        return " " * column + value
    return value


def _take_trailing(container: Any, key: Any) -> str:
    """Detach the comment lines after an entry's subtree (they belong to what follows it)."""
    value = container[key]
    if _is_block(value):
        text = _take_trailing(value, _last_key(value))
        end = getattr(value.ca, "end", None) or []
        text += "".join(_token_text(t) for t in end)
        if end:
            value.ca.end = []
        return text
    tokens = container.ca.items.get(key)
    slot = _slot(container)
    if not tokens or len(tokens) <= slot or tokens[slot] is None:
        return ""
    own, newline, after = str(tokens[slot].value).partition("\n")
    tokens[slot].value = own + newline
    return after


def _put_trailing(container: Any, key: Any, text: str) -> None:
    """Attach comment lines after an entry's subtree."""
    if not text:
        return
    value = container[key]
    if _is_block(value):
        _put_trailing(value, _last_key(value), text)
        return
    slot = _slot(container)
    tokens = container.ca.items.setdefault(key, [None, None, None, None])
    while len(tokens) <= slot:
        tokens.append(None)
    if tokens[slot] is None:
        tokens[slot] = CommentToken("\n" + text, CommentMark(0), None)
    else:
        existing = str(tokens[slot].value)
        tokens[slot].value = existing + ("" if existing.endswith("\n") else "\n") + text


def _remove_entry(container: Any, key: Any) -> None:
    """Delete a mapping key or list item, keeping the comments that belong to its neighbours.

    ruamel attaches the comment lines *below* an entry to that entry, so deleting
    it naively would also delete the heading comment of the next model or the
    commented example at the end of the file.
    """
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    position = keys.index(key)
    trailing = _take_trailing(container, key)
    if isinstance(container, dict):
        container.ca.items.pop(key, None)
    del container[key]
    if position > 0:
        before = _take_trailing(container, keys[position - 1])
        _put_trailing(container, keys[position - 1], _one_blank_line(before + trailing))
    elif trailing.strip():
        first = next(iter(container)) if isinstance(container, dict) else 0
        if isinstance(container, dict):
            tokens = container.ca.items.setdefault(first, [None, None, None, None])
            tokens[1] = [CommentToken(trailing, CommentMark(0), None)]


def _append(container: Any, key: Any, value: Any) -> None:
    """Add an entry at the end, below the previous last entry but above the comments after it."""
    trailing = _take_trailing(container, _last_key(container)) if len(container) else ""
    if isinstance(container, dict):
        container[key] = value
    else:
        container.append(value)
    _put_trailing(container, _last_key(container), trailing)


def _one_blank_line(text: str) -> str:
    """Joined comment runs keep at most one blank line between them."""
    return re.sub(r"(?:^|(?<=\n))(?:[ \t]*\n){2,}", "\n", text)


def _guess_indent(text: str) -> tuple[int, int, int]:
    """The file's own indentation (mapping, sequence, dash offset), so edits keep it."""
    mapping = sequence = offset = None
    previous: tuple[int, str] | None = None
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if previous is not None and indent > previous[0] and previous[1].split(" #")[0].rstrip().endswith(":"):
            step = indent - previous[0]
            if stripped.startswith("- ") or stripped == "-":
                if sequence is None:
                    after_dash = len(stripped) - len(stripped[1:].lstrip(" ")) if len(stripped) > 1 else 2
                    offset, sequence = step, step + after_dash
            elif mapping is None:
                mapping = step
        previous = (indent, stripped)
        if mapping is not None and sequence is not None:
            break
    mapping = mapping or 2
    if sequence is None:
        sequence, offset = mapping, 0
    return mapping, sequence, offset or 0


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temp file in the same directory and rename: never a half-written file."""
    import stat
    import tempfile

    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise

"""The fleet file's schema: every key is declared once, as a dataclass field, here.

THE SINGLE-EDIT RULE. A key of the fleet file is a dataclass field made with
`setting(...)`. That one call holds everything about the key: its default, its
check (kind, range, choices, a relation to a sibling), its help text, whether it
is secret, and when `config show` prints it. The reader (reader.py), the display
(show.py) and the editor (edit.py) walk these declarations and name no key
themselves, so adding a key is one edit here; tests/test_config_schema.py checks
that every declared key is read, shown, masked if secret, and settable.

Fields made without `setting` (ModelSpec.name, ServerSpec.line, FleetConfig.path)
are not keys of the file: they come from where a record stands in it.
Rules that tie records together (one host:port per server, one model per alias)
are the reader's, since no single field owns them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

POLICIES = ("peak_ewma", "fastest", "least_loaded", "round_robin", "random")
BACKENDS = ("vllm", "sglang", "sim")
KINDS = ("chat", "embedding")
DEVICES = ("gpu", "cpu")
MASK = "***"
MESSAGE_KEYS = ("role", "content")

# What a key's value is; the reader has one rule per kind.
VALUE_KINDS = (
    "number", "integer", "text",  # scalars, range- or choice-checked
    "switch",  # true or false
    "delay",  # off, auto, or a number of seconds > 0 (routing.hedge_after)
    "indexes",  # unique non-negative integers (gpus, cpus)
    "names",  # unique other names of the record (aliases)
    "texts",  # a list of strings (empty ones, as `${VAR:-}` may make, are dropped)
    "argv",  # a program and its arguments
    "flags",  # engine flags: name -> plain value
    "environment",  # variable name -> string
    "messages",  # chat messages of {role, content}
    "section",  # one nested record (another dataclass of this module)
    "records",  # a list of nested records
    "named",  # a mapping of name -> nested record
)
CHILDREN = ("records", "named")  # read after their owner's other keys, listed after them
MAPPINGS = ("section", "named", "flags", "environment")  # `config set` may create these

_SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


@dataclass(frozen=True)
class Key:
    """Everything about one key of the fleet file but its name and default."""

    help: str
    kind: str
    above: float | None = None  # number/integer: must be greater than
    minimum: float | None = None
    maximum: float | None = None
    at_most: str | None = None  # a sibling key this one must not exceed
    choices: tuple[str, ...] = ()  # text: one of these
    blank: str = "error"  # text: an empty value is an "error", is kept ("keep"), or means None ("none")
    check: Callable[[str], str | None] | None = None  # text: returns what is wrong, or None
    conflicts: tuple[str, str] | None = None  # (sibling key, message): not both
    one_of: str = ""  # a group name: its record sets exactly one key of the group
    requires: tuple[str, str] | None = None  # (sibling key, message): set, it needs the sibling
    only_with: tuple[str, ...] = ()  # set, it needs one of these siblings set (else it means nothing)
    forbidden_when: tuple[str, str, str] | None = None  # (owner's key, its value, message)
    what: str = ""  # indexes: what one index names, for messages ("GPU")
    of: type | None = None  # section / records / named: the nested record's dataclass
    inherits: bool = False  # section: unset keys come from the owner's key of the same name
    empty: str = ""  # list kinds: the message when the list is empty
    missing: str = ""  # required key: the message when it is absent (else a generic one)
    default_from: str | None = None  # unset: the value of this (non-key) field instead
    secret: bool = False  # never printed, never in messages
    secret_entries: re.Pattern[str] | None = None  # mapping: entries whose names match are secret
    show: str | Callable[[Any], bool] = "always"  # "always", "if_set", or a test on the owner
    required: bool = False  # filled in by setting(): the field has no default


def setting(default: Any = MISSING, *, help: str, kind: str, **options: Any) -> Any:
    """A dataclass field that is a key of the fleet file (see the single-edit rule above)."""
    if kind not in VALUE_KINDS:
        raise ValueError(f"unknown value kind {kind!r}")
    if options.get("of") is None and is_dataclass(default):
        options["of"] = type(default)
    factory: Any = MISSING
    if isinstance(default, (dict, list)):
        factory, default = (lambda value=default: type(value)(value)), MISSING
    key = Key(help=help, kind=kind, required=default is MISSING and factory is MISSING, **options)
    return field(default=default, default_factory=factory, repr=not (key.secret or key.secret_entries),
                 metadata={"key": key})


def _bare_host(host: str) -> str | None:
    if "://" in host or "/" in host or " " in host.strip():
        return "write the host name or address only (e.g. 10.0.0.3)"
    return None


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _dns_name(name: str) -> str | None:
    """A name DNS can look up: dot-separated labels of letters, digits, - (and _)."""
    if _is_address(name):
        return "is an address, not a name; list fixed addresses under servers: instead"
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return ("must be a DNS name: labels of letters, digits and - (at most 63 characters) "
                "joined by dots, e.g. llama.fleet.svc.cluster.local")
    return None


def _srv_name(name: str) -> str | None:
    wrong = _dns_name(name)
    if wrong is None and not re.match(r"_[^.]+\._[^.]+\.[^.]", name):
        wrong = "must be an SRV name: _service._proto.NAME, e.g. _http._tcp.llama.fleet.svc"
    return wrong


def _nameserver(text: str) -> str | None:
    """IP, IP:PORT, or [IPv6]:PORT."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text) or \
        re.fullmatch(r"([0-9.]+)(?::(\d+))?", text) or re.fullmatch(r"([0-9A-Fa-f:]+)()", text)
    if m is None or not _is_address(m.group(1)) or (m.group(2) and not 1 <= int(m.group(2)) <= 65535):
        return "must be an IP address with an optional port: 10.0.0.2, 10.0.0.2:5353 or [fd00::2]:53"
    return None


def _label_check(pattern: re.Pattern[str], what: str) -> Callable[[str], str | None]:
    def check(text: str) -> str | None:
        if not pattern.fullmatch(text):
            return f"must be {what} (at most 63 characters)"
        return None
    return check


# --------------------------------------------------------------------------------------------
# The records. Field order is the order of `config show` and of "known keys" hints.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimSpec:
    """Settings of the simulated engine (backend `sim`); mirrors `modelfleet sim` flags."""

    speed: float = setting(1.0, kind="number", above=0, help="how fast it generates, 1 = baseline")
    batch_slowdown: float = setting(0.02, kind="number", minimum=0,
                                    help="extra time per token for each request batched alongside")
    dim: int = setting(384, kind="integer", minimum=1, help="length of the embedding vectors")
    max_batch: int = setting(64, kind="integer", minimum=1, help="requests run at once; more wait in a queue")
    seed: int = setting(0, kind="integer", help="seed of the generated text and timings")
    kv_cache_tokens: int | None = setting(
        None, kind="integer", minimum=16, show="if_set",
        help="KV cache size in tokens, with prefix caching; default none (no prefix caching)")


@dataclass(frozen=True)
class ServerSpec:
    """One server of a model. Only host and port matter to the client; the rest to the launcher."""

    host: str = setting(kind="text", check=_bare_host, help="host name or address of the server")
    port: int = setting(kind="integer", minimum=1, maximum=65535, help="its HTTP port")
    gpus: tuple[int, ...] = setting((), kind="indexes", what="GPU", show="if_set",
                                    forbidden_when=("device", "cpu", "the model runs on the CPU "
                                                    "(device: cpu); remove gpus or set device: gpu"),
                                    help="GPU indexes the launcher gives the engine")
    cpus: tuple[int, ...] = setting((), kind="indexes", what="CPU", show="if_set",
                                    help="CPU cores the launcher pins the engine to")
    min_free_memory_gb: float | None = setting(None, kind="number", above=0, show="if_set",
                                               help="the launcher waits until each GPU has this much free")
    sim: SimSpec | None = setting(None, kind="section", of=SimSpec, inherits=True, show="if_set",
                                  help="per-server override of the model's sim settings")
    line: int | None = None  # where it stands in the file, for messages

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class KubernetesDiscoverSpec:
    """A Service's endpoints, read from its EndpointSlices (modelfleet/discovery/kubernetes.py)."""

    namespace: str = setting(kind="text", check=_label_check(_DNS_1123_LABEL, "a namespace name: "
                                                             "lowercase letters, digits and -"),
                             help="the Service's namespace")
    service: str = setting(kind="text", check=_label_check(_DNS_1035_LABEL, "a Service name: "
                                                           "lowercase letters, digits and -, "
                                                           "starting with a letter"),
                           help="the Service whose endpoints are the servers")
    port: int | None = setting(None, kind="integer", minimum=1, maximum=65535, one_of="port",
                               show="if_set", help="the servers' port number")
    port_name: str | None = setting(None, kind="text", one_of="port", show="if_set",
                                    check=_label_check(_DNS_1123_LABEL, "a port name: lowercase "
                                                       "letters, digits and -"),
                                    help="the name of the Service's port (e.g. http)")
    kubeconfig: str | None = setting(None, kind="text", show="if_set",
                                     help="a kubeconfig file; default: the in-cluster service "
                                          "account, else ~/.kube/config")
    relist_s: float = setting(300.0, kind="number", above=0,
                              help="seconds between full relists (a watch may go stale)")


@dataclass(frozen=True)
class DiscoverSpec:
    """Where a model's servers are found when they are not listed (modelfleet/discovery/)."""

    dns: str | None = setting(None, kind="text", check=_dns_name, one_of="source", show="if_set",
                              requires=("port", "give the servers' port with dns, e.g. port: 8000"),
                              help="a name whose A/AAAA records are the servers")
    dns_srv: str | None = setting(None, kind="text", check=_srv_name, one_of="source",
                                  show="if_set", help="an SRV name (_http._tcp.NAME) whose "
                                                      "records give the servers and ports")
    port: int | None = setting(None, kind="integer", minimum=1, maximum=65535, show="if_set",
                               only_with=("dns",), help="the servers' port (with dns)")
    every_s: float = setting(5.0, kind="number", above=0, only_with=("dns", "dns_srv"),
                             show=lambda spec: spec.kubernetes is None,
                             help="seconds between lookups (sooner when the records' TTL says)")
    nameserver: str | None = setting(None, kind="text", check=_nameserver, show="if_set",
                                     only_with=("dns", "dns_srv"),
                                     help="IP or IP:PORT of the DNS server; default: the system's")
    kubernetes: KubernetesDiscoverSpec | None = setting(
        None, kind="section", of=KubernetesDiscoverSpec, one_of="source", show="if_set",
        help="a Kubernetes Service whose ready endpoints are the servers")

    def describe(self) -> str:
        """Where the servers come from, in a few words (the report, errors)."""
        if self.kubernetes is not None:
            k8s = self.kubernetes
            return f"kubernetes {k8s.namespace}/{k8s.service}:{k8s.port or k8s.port_name}"
        if self.dns_srv is not None:
            return f"dns srv {self.dns_srv}"
        return f"dns {self.dns}:{self.port}"


@dataclass(frozen=True)
class ModelSpec:
    """A model and every server that serves it (listed, or found by `discover`)."""

    name: str
    servers: tuple[ServerSpec, ...] = setting(
        (), kind="records", of=ServerSpec, one_of="servers", show="if_set",
        help="the servers of this model",
        empty="lists no servers; a model needs at least one, e.g. - {host: 127.0.0.1, port: 8000}"
              " (or discover: to find them through DNS or Kubernetes)")
    discover: DiscoverSpec | None = setting(None, kind="section", of=DiscoverSpec, one_of="servers",
                                            show="if_set",
                                            help="find the servers through DNS or Kubernetes "
                                                 "instead of listing them")
    kind: str = setting("chat", kind="text", choices=KINDS, help="what it answers: chat or embedding")
    aliases: tuple[str, ...] = setting((), kind="names", help="other names callers may use")
    model_path: str | None = setting(None, kind="text", default_from="name",
                                     help="what the engine loads; defaults to the name")
    served_name: str = setting("", kind="text", default_from="name",
                               help="the `model` on the wire; defaults to the name")
    backend: str = setting("vllm", kind="text", choices=BACKENDS, help="the engine that serves it")
    api_key: str | None = setting(None, kind="text", blank="none", secret=True, show="if_set",
                                  help="bearer token for its servers; empty means none")
    backend_args: Mapping[str, Any] = setting({}, kind="flags", show="if_set",
                                              help="engine flags, without dashes")
    sim: SimSpec = setting(SimSpec(), kind="section", show=lambda model: model.backend == "sim",
                           help="settings of the simulated engine")
    env: Mapping[str, str] = setting({}, kind="environment", secret_entries=_SECRET_ENV_NAME,
                                     show="if_set", help="extra environment for the engine")
    python: str | None = setting(None, kind="text", show="if_set",
                                 conflicts=("command", "give either command (the full argv) or python "
                                            "(the interpreter), not both"),
                                 help="interpreter that runs the engine as `python -m <module>`")
    command: tuple[str, ...] | None = setting(
        None, kind="argv", show="if_set", help="full argv override for the engine",
        empty="must list the program and its arguments, e.g. [python, -m, vllm.entrypoints.openai.api_server]")
    device: str = setting("gpu", kind="text", choices=DEVICES, help="gpu | cpu: cpu skips NVML entirely")

    @property
    def wire_name(self) -> str:
        return self.served_name or self.name

    def sim_for(self, server: ServerSpec) -> SimSpec:
        return server.sim or self.sim


@dataclass(frozen=True)
class RoutingSpec:
    """How the client picks servers and when it gives up on one."""

    policy: str = setting("peak_ewma", kind="text", choices=POLICIES, help="how a server is picked")
    latency_growing_rate: float = setting(2.0, kind="number", above=1,
                                          help="how many times slower than the fastest counts as degraded")
    max_retry: int = setting(5, kind="integer", minimum=1, help="servers tried per request at most")
    request_timeout_s: float = setting(600.0, kind="number", above=0, help="a whole request's deadline")
    probe_interval_s: float = setting(5.0, kind="number", above=0, help="seconds between background probes")
    stall_timeout_s: float = setting(5.0, kind="number", above=0, at_most="request_timeout_s",
                                     help="silence after which a server counts as stalled")
    # Retries allowed as a fraction of recent requests (Finagle's RetryBudget), plus a
    # small per-second floor so a quiet client can still retry.
    retry_budget_ratio: float = setting(0.2, kind="number", minimum=0,
                                        help="retries as a fraction of recent requests")
    retry_budget_min_per_s: float = setting(10.0, kind="number", minimum=0,
                                            help="retries per second allowed whatever the traffic")
    prefix_aware: bool = setting(True, kind="switch",
                                 help="send prompts that share a prefix where it is likely cached")
    # Hedged requests ("The Tail at Scale"): no first token by then, a copy goes to the
    # next-best other server and the first to start answering wins (client/hedge.py).
    hedge_after: str | float = setting(
        "off", kind="delay", help="off | auto (about the server's p95 time to first token) | "
        "seconds: a copy to another server when no first token came by then")
    hedge_budget: float = setting(0.05, kind="number", minimum=0, maximum=1,
                                  help="hedges as a fraction of recent requests, at most")
    continue_streams: bool = setting(True, kind="switch",
                                     help="a stream that breaks after its first token goes on "
                                          "on another server")


@dataclass(frozen=True)
class BenchmarkSpec:
    """What background probes send: kept tiny so probing costs the fleet nothing."""

    messages: tuple[Mapping[str, str], ...] = setting(
        ({"role": "user", "content": "Say OK."},), kind="messages", help="the chat a probe sends",
        empty='must hold at least one message, e.g. [{role: user, content: "Say OK."}]')
    embedding_input: str = setting("benchmark sentence", kind="text", help="the text an embedding probe sends")
    max_tokens: int = setting(8, kind="integer", minimum=1, help="tokens a chat probe asks for")


def _readable_file(path: str) -> str | None:
    if not path.strip():
        return "must name a file"
    return None


@dataclass(frozen=True)
class GatewaySpec:
    """`modelfleet gateway`: the fleet as one OpenAI endpoint (its flags override these)."""

    host: str = setting("127.0.0.1", kind="text", check=_bare_host,
                        help="address the gateway listens on (0.0.0.0: every interface)")
    port: int = setting(8000, kind="integer", minimum=1, maximum=65535,
                        help="the port it listens on")
    workers: int = setting(1, kind="integer", minimum=1, maximum=256,
                           help="processes sharing the port (SO_REUSEPORT), each with its own routing")
    api_keys: tuple[str, ...] = setting((), kind="texts", secret=True, show="if_set",
                                        help="bearer keys clients must send; none: no key asked")
    api_keys_file: str | None = setting(None, kind="text", check=_readable_file, show="if_set",
                                        help="a file of more keys, one a line (# comments)")
    auth_health_metrics: bool = setting(False, kind="switch",
                                        help="ask for a key on /health and /metrics too")
    max_body_bytes: int = setting(16 * 1024 * 1024, kind="integer", minimum=1024,
                                  help="largest request body accepted (larger: 413)")
    max_concurrent: int = setting(1024, kind="integer", minimum=1,
                                  help="requests at once per worker; more are refused with 429")
    drain_s: float = setting(30.0, kind="number", minimum=0,
                             help="on SIGTERM, how long in-flight requests may take to finish")
    access_log: bool = setting(True, kind="switch", help="one line per request on stderr")
    launch_on: str | None = setting(None, kind="text", check=_bare_host, show="if_set",
                                    help="the host whose `modelfleet serve` starts the gateway too")


@dataclass(frozen=True)
class FleetConfig:
    """The whole fleet, as read from one file."""

    models: Mapping[str, ModelSpec] = setting(
        kind="named", of=ModelSpec, help="each model and its servers",
        empty="lists no models; add at least one with its servers",
        missing="missing: the fleet file needs a `models:` section listing each model and its servers")
    routing: RoutingSpec = setting(RoutingSpec(), kind="section", help="how the client picks servers")
    benchmark: BenchmarkSpec = setting(BenchmarkSpec(), kind="section", help="what background probes send")
    gateway: GatewaySpec = setting(GatewaySpec(), kind="section",
                                   help="modelfleet gateway: the fleet as one OpenAI endpoint")
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
# Walking the schema: what the reader, the display and the editor use instead of key lists.
# --------------------------------------------------------------------------------------------

@functools.cache
def keys_of(record: type) -> dict[str, Key]:
    """A record's keys in file order: its own settings, then its children (servers, models)."""
    found = [(f.name, f.metadata["key"]) for f in fields(record) if "key" in f.metadata]
    return dict([kv for kv in found if kv[1].kind not in CHILDREN] + [kv for kv in found if kv[1].kind in CHILDREN])


def field_of(record: type, name: str) -> Field[Any]:
    return next(f for f in fields(record) if f.name == name)


def default_of(record: type, name: str) -> Any:
    """A key's default value (MISSING for a required key)."""
    f = field_of(record, name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _child_pattern(pattern: str, name: str, key: Key) -> str:
    sub = f"{pattern}.{name}" if pattern else name
    return f"{sub}.*" if key.kind == "named" else f"{sub}[]" if key.kind == "records" else sub


@functools.cache
def record_patterns() -> dict[str, type]:
    """Where each record's keys live: {"": FleetConfig, "models.*": ModelSpec, "models.*.servers[]": ...}."""
    found: dict[str, type] = {}

    def walk(pattern: str, record: type) -> None:
        found[pattern] = record
        for name, key in keys_of(record).items():
            if key.of is not None:
                walk(_child_pattern(pattern, name, key), key.of)

    walk("", FleetConfig)
    return found


def all_keys() -> dict[str, Key]:
    """Every key by its path pattern (model names as *, list items as [])."""
    return {(f"{pattern}.{name}" if pattern else name): key
            for pattern, record in record_patterns().items() for name, key in keys_of(record).items()}


def known_keys(pattern: str) -> tuple[str, ...]:
    record = record_patterns().get(pattern)
    return tuple(keys_of(record)) if record else ()


def creatable() -> frozenset[str]:
    """Paths where `config set` may create a missing mapping."""
    return frozenset(path for path, key in all_keys().items() if key.kind in MAPPINGS)


SECRET_KEYS = frozenset(path.rsplit(".", 1)[-1] for path, key in all_keys().items() if key.secret)
SECRET_ENTRIES = {path.rsplit(".", 1)[-1]: key.secret_entries for path, key in all_keys().items()
                  if key.secret_entries is not None}


def is_secret(path: str) -> bool:
    """A secret key anywhere, and entries of a mapping whose names say they hold a credential."""
    parts = re.sub(r"\[\d+\]$", "", path).split(".")  # an item of a secret list is secret
    if parts[-1] in SECRET_KEYS:
        return True
    pattern = SECRET_ENTRIES.get(parts[-2]) if len(parts) >= 2 else None
    return pattern is not None and bool(pattern.search(parts[-1]))

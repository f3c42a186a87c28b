"""Which servers of the fleet belong to this machine, and where each one binds.

One fleet file serves every GPU host, so each launcher picks its share by
comparing the servers' `host` with this machine's own addresses and names
(every interface psutil sees, the hostname, loopback). No interface name is
assumed (the old launcher read `eno1` and broke elsewhere). `--host` replaces
the detection for machines whose configured address is not on an interface
(NAT, containers), and `--only` narrows the share to one model.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import psutil

from modelfleet.config import FleetConfig, ModelSpec, ServerSpec
from modelfleet.errors import UnknownModel, UsageError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class LocalServer:
    """A server this launcher runs: the model it serves, its entry, and the address it binds."""

    model: ModelSpec
    server: ServerSpec
    bind_host: str

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity across config reloads: the same model at the same address."""
        return (self.model.name, self.server.host, self.server.port)

    @property
    def label(self) -> str:
        return f"{self.model.name} {self.server.address}"

    @property
    def health_host(self) -> str:
        """Where the launcher itself reaches the server (wildcard binds answer on loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.bind_host, self.bind_host)

    @property
    def on_gpu(self) -> bool:
        return self.model.device == "gpu" and bool(self.server.gpus)

    @property
    def needs_nvml(self) -> bool:
        """Real engines on listed GPUs wait on real memory; the sim never needs NVML."""
        return self.on_gpu and self.model.backend != "sim"

    def settings(self) -> tuple[ModelSpec, ServerSpec, str]:
        """Everything that shapes how it runs, minus file positions, to see if a reload changed it."""
        return replace(self.model, servers=()), replace(self.server, line=None), self.bind_host


def normalise(host: str) -> str:
    host = host.strip().lower().strip("[]")
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return host.rstrip(".")


def local_names() -> frozenset[str]:
    """Every address and name by which a fleet file could mean this machine."""
    names = set(LOOPBACK_NAMES)
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name)
            names.add(name.split(".")[0])
    return frozenset(normalise(n) for n in names)


def bind_host_for(host: str, names: Iterable[str]) -> str:
    """Bind the configured address when it is one of ours; a name or foreign IP binds everywhere.

    A hostname can resolve to a loopback-only address (Debian maps it to
    127.0.1.1), and an address given through `--host` may sit behind NAT, so
    binding to either would make the server unreachable from other hosts.
    """
    host = normalise(host)
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    if host in set(names):
        return host
    return "::" if ip.version == 6 else "0.0.0.0"


def select_servers(
    config: FleetConfig,
    *,
    host: str | None = None,
    only: str | None = None,
    names: frozenset[str] | None = None,
    allow_empty: bool = False,
) -> list[LocalServer]:
    """This machine's share of the fleet, in file order; a usage error when it is empty.

    A reload may empty the share on purpose (every server moved away), so it allows that.
    """
    names = local_names() if names is None else names
    models: Sequence[ModelSpec] = list(config.models.values())
    if only is not None:
        try:
            models = [config.resolve_model(only)]
        except UnknownModel as exc:
            raise UsageError(f"--only: {exc}") from None
    wanted = (lambda h: normalise(h) == normalise(host)) if host else (lambda h: normalise(h) in names)
    mine = [
        LocalServer(model=model, server=server, bind_host=bind_host_for(server.host, names))
        for model in models
        for server in model.servers
        if wanted(server.host)
    ]
    if not mine and not allow_empty:
        hosts = sorted({s.host for m in models for s in m.servers})
        where = f"--host {host}" if host else "this machine (" + ", ".join(sorted(names)) + ")"
        scope = f"model {only!r}" if only else "the fleet file"
        hint = ("check the spelling of --host" if host else
                "run the launcher on one of those hosts, or pass --host NAME_OR_IP to serve that "
                "host's share here")
        found = [m.name for m in models if m.discover is not None]
        if found:  # their servers are started by whatever they are found in (Kubernetes, ...)
            hint += (f"; {', '.join(found)} find their servers through discover:, which the "
                     "launcher does not start")
        raise UsageError(
            f"no server of {scope} belongs to {where}; its servers are on: "
            f"{', '.join(hosts) or '(none)'}; {hint}"
        )
    check_ports(mine)
    return mine


def gateway_is_here(config: FleetConfig, *, host: str | None = None,
                    names: frozenset[str] | None = None) -> bool:
    """Whether this launcher starts the gateway too: `gateway.launch_on` names this machine
    (or the host given with --host)."""
    where = config.gateway.launch_on
    if not where:
        return False
    if host:
        return normalise(where) == normalise(host)
    return normalise(where) in (local_names() if names is None else names)


def check_ports(servers: Sequence[LocalServer]) -> None:
    """Two entries can name this machine differently (localhost vs its IP) yet share a port."""
    seen: dict[int, LocalServer] = {}
    for local in servers:
        other = seen.setdefault(local.server.port, local)
        if other is not local:
            raise UsageError(
                f"{other.label} and {local.label} both use port {local.server.port} on this "
                "machine; give one of them another port"
            )

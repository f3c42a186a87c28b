"""`python serve_pipeline.py` / `modelfleet serve`: flags, wiring, signals.

Programmatic entry: `launcher.run(argv) -> exit code`. A program that starts
the launcher as a subprocess learns that every server is up from the line
`all N servers RUNNING` on stdout, or by waiting for `--ready-file PATH`, which
is written (JSON: name, address and pid of each server) each time every server
has become RUNNING, and removed when the launcher exits.

Exit codes: 0 after SIGINT/SIGTERM stopped everything (or after --dry-run),
2 for a bad flag, config, GPU plan or unreadable GPUs, 1 for other failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from modelfleet.config import FleetConfig
from modelfleet.errors import ConfigError, FleetError, GpuProbeError, UsageError

from .commands import LaunchSpec, build_gateway_launch, build_launch
from .gpus import DescribedGpuProbe, GpuProbe, NvmlProbe
from .hosts import LocalServer, gateway_is_here, select_servers
from .memory import plan_memory, start_groups
from .supervisor import ServerProcess, Supervisor, SupervisorOptions

log = logging.getLogger("launcher")


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's flags (without -c, which `modelfleet` shares between its subcommands)."""
    defaults = SupervisorOptions()
    p = parser
    p.add_argument("--host", metavar="NAME_OR_IP",
                   help="serve the servers whose host is this (default: match this machine's addresses and names)")
    p.add_argument("--only", metavar="MODEL", help="serve only this model's servers (name or alias)")
    p.add_argument("--log-dir", metavar="DIR", default="logs", help="one log per server, size-capped (default: logs/)")
    p.add_argument("--fake-gpus", metavar="FILE",
                   help="read GPU memory from this YAML file instead of NVML (simulated; re-read on every poll)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each server's argv, environment (secrets masked), memory fraction and start order; start nothing")
    p.add_argument("--poll-s", type=_positive(float), default=defaults.poll_s, metavar="S",
                   help=f"how often a waiting server reads GPU memory (default {defaults.poll_s:g})")
    p.add_argument("--ready-timeout", type=_positive(float), default=defaults.ready_timeout_s, metavar="S",
                   help=f"seconds a server may take to answer /health (default {defaults.ready_timeout_s:g})")
    p.add_argument("--grace-s", type=_positive(float), default=defaults.grace_s, metavar="S",
                   help=f"seconds between SIGTERM and SIGKILL when stopping a server (default {defaults.grace_s:g})")
    p.add_argument("--startsecs", type=_positive(float), default=defaults.startsecs, metavar="S",
                   help=f"a server dying sooner than this after ready counts as a failed start (default {defaults.startsecs:g})")
    p.add_argument("--startretries", type=_positive(int), default=defaults.startretries, metavar="N",
                   help=f"failed starts in a row before a server is FATAL (default {defaults.startretries})")
    p.add_argument("--backoff-s", type=_positive(float), default=defaults.backoff_s, metavar="S",
                   help=f"first restart delay, doubled per failed start up to 60 s (default {defaults.backoff_s:g})")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write this JSON file when every server is RUNNING (for scripts that wait on the fleet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve_pipeline.py",
        description="Start and supervise the model servers of the fleet file that belong to this host.",
    )
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="fleet file (default: $MODELFLEET_CONFIG, else ./client_config.yaml)")
    add_arguments(parser)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """`python serve_pipeline.py ARGS`; returns the exit code."""
    args = build_parser().parse_args(argv)
    return execute(args)


def execute(args: argparse.Namespace) -> int:
    """Run with parsed flags; every expected failure becomes a message and an exit code."""
    try:
        return serve(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (UsageError, GpuProbeError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `serve --dry-run | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


class Planner:
    """Config -> this host's LaunchSpecs; keeps the GPU probe so reloads reuse it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str | None = args.host
        self.only: str | None = args.only
        self.log_dir = Path(args.log_dir)
        self.fake_gpus: str | None = args.fake_gpus
        self.probe: GpuProbe | None = None
        self.config: FleetConfig | None = None  # the one planned last

    def gateway(self, config: FleetConfig, config_path: Path) -> tuple[LaunchSpec, object] | None:
        """The gateway's launch, when the fleet file starts it on this host (and the
        settings a reload compares: a changed fleet restarts it)."""
        if self.only is not None or not gateway_is_here(config, host=self.host):
            return None
        from modelfleet.config import fleet_to_dict

        spec = build_gateway_launch(config_path, config.gateway, self.log_dir)
        return spec, fleet_to_dict(config, mask_secrets=False)

    def plan(self, config: FleetConfig, *, reload: bool = False) -> list[tuple[LocalServer, LaunchSpec]]:
        alone = self.only is None and gateway_is_here(config, host=self.host)
        mine = select_servers(config, host=self.host, only=self.only, allow_empty=reload or alone)
        gateway_port = config.gateway.port if alone else None
        for local in mine:
            if local.server.port == gateway_port:
                raise UsageError(f"gateway.port {gateway_port} is also the port of {local.label} "
                                 "on this machine; give one of them another port")
        gpus = None
        needers = [s for s in mine if s.needs_nvml]
        if self.fake_gpus:
            if self.probe is None:
                self.probe = DescribedGpuProbe(self.fake_gpus)
            gpus = self.probe.read()
        elif needers:
            if self.probe is None:
                self.probe = NvmlProbe(needed_by=", ".join(s.label for s in needers))
            gpus = self.probe.read()
        self.config = config
        shares = plan_memory(mine, gpus)
        return [(local, build_launch(local, shares[local.key], self.log_dir)) for local in mine]


def gpu_note(probe: GpuProbe | None) -> str:
    if probe is None:
        return "not read (no server waits for GPU memory)"
    return probe.source


def print_dry_run(config_path: Path, planned: Sequence[tuple[LocalServer, LaunchSpec]], planner: Planner) -> None:
    simulated = planner.probe is not None and planner.probe.simulated
    gpus = planner.probe.read() if planner.probe is not None else {}
    print(f"dry run: nothing is started. Fleet file: {config_path}. GPUs: {gpu_note(planner.probe)}.")
    for local, spec in planned:
        print(spec.label)
        print(f"  argv: {spec.shown_argv()}")
        env = spec.shown_env()
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) if env else "(nothing added)"
        print(f"  env: {shown}")
        if local.model.device == "cpu":
            memory = "device cpu: no GPU memory"
        elif spec.memory_fraction is None and not spec.need_gb:
            memory = "no GPU memory planned" if not local.server.gpus else f"GPUs {list(local.server.gpus)}: no memory to wait for"
        else:
            parts = []
            if spec.memory_fraction is not None:
                parts.append(f"fraction {spec.memory_fraction:g}")
            for g, need in spec.need_gb:
                gpu = gpus.get(g)
                what = f"{gpu.name}, {gpu.total_gb:.1f} GB{', simulated' if simulated else ''}" if gpu else "?"
                parts.append(f"waits for {need:.1f} GB free on GPU {g} ({what})")
            memory = "; ".join(parts)
        print(f"  memory: {memory}")
        print(f"  log: {spec.log_path}")
    gateway = planner.gateway(planner.config, config_path) if planner.config else None
    if gateway is not None:
        print(gateway[0].label)
        print(f"  argv: {gateway[0].shown_argv()}")
        print(f"  log: {gateway[0].log_path}")
    print("start order:")
    groups = start_groups([local for local, _ in planned])
    together = [g[0].label for g in groups if len(g) == 1]
    for group in groups:
        if len(group) > 1:
            shared = sorted({g for s in group for g in s.server.gpus})
            print(f"  one at a time (shared GPU {', '.join(map(str, shared))}): "
                  + ", ".join(s.label for s in group))
    if together:
        print("  concurrently: " + ", ".join(together))


def setup_logging(log_dir: Path) -> None:
    """Status lines on stdout (line-buffered, for whoever reads the pipe) and in logs/launcher.log."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        log_dir / "launcher.log", maxBytes=5_000_000, backupCount=3, encoding="utf-8")
    file_handler.setFormatter(fmt)
    log.addHandler(file_handler)


def write_ready_file(path: Path, servers: Sequence[ServerProcess]) -> None:
    body = {"servers": [{"name": s.spec.key[0], "address": f"{s.spec.key[1]}:{s.spec.key[2]}", "pid": s.pid}
                        for s in servers]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)


def serve(args: argparse.Namespace) -> int:
    from modelfleet.config import find_config_path, load_config

    config_path = find_config_path(getattr(args, "config", None))
    config = load_config(config_path)
    planner = Planner(args)
    planned = planner.plan(config)
    if args.dry_run:
        print_dry_run(config_path, planned, planner)
        return 0

    options = SupervisorOptions(
        poll_s=max(args.poll_s, 0.01), ready_timeout_s=args.ready_timeout, grace_s=args.grace_s,
        startsecs=args.startsecs, startretries=max(1, int(args.startretries)), backoff_s=args.backoff_s,
    )
    setup_logging(Path(args.log_dir))
    ready_file = Path(args.ready_file) if args.ready_file else None
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)

    def on_all_running(servers: Sequence[ServerProcess]) -> None:
        if ready_file is not None:
            write_ready_file(ready_file, servers)

    supervisor = Supervisor(options, planner.probe, on_all_running=on_all_running)
    wake = threading.Event()
    asked: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        asked.append(signal.Signals(signum).name)
        wake.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)

    log.info("serving %d servers of %s on this host; GPUs: %s; logs in %s/",
             len(planned), config_path, gpu_note(planner.probe), args.log_dir)
    gateway = planner.gateway(config, config_path)
    supervisor.apply([*((spec, local.settings()) for local, spec in planned),
                      *([gateway] if gateway else [])])
    try:
        while True:
            wake.wait(1.0)
            wake.clear()
            while asked:
                name = asked.pop(0)
                if name == "SIGHUP":
                    reload(config_path, planner, supervisor)
                    continue
                log.info("%s: stopping every server (SIGTERM, SIGKILL after %g s)", name, options.grace_s)
                supervisor.stop_all()
                log.info("all servers stopped")
                return 0
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        if planner.probe is not None:
            planner.probe.close()


def reload(config_path: Path, planner: Planner, supervisor: Supervisor) -> None:
    """SIGHUP: apply the file as it is now; a broken file changes nothing."""
    from modelfleet.config import load_config

    log.info("SIGHUP: re-reading %s", config_path)
    try:
        planned = planner.plan(load_config(config_path), reload=True)
    except FleetError as exc:
        log.error("reload failed, the servers keep running as they are:\n%s", exc)
        return
    supervisor.probe = planner.probe
    gateway = planner.gateway(planner.config, config_path) if planner.config else None
    added, removed, changed = supervisor.apply(
        [*((spec, local.settings()) for local, spec in planned), *([gateway] if gateway else [])])
    kept = len(planned) + (gateway is not None) - len(added) - len(changed)
    log.info("reloaded: %d added, %d removed, %d changed (restarted), %d unchanged",
             len(added), len(removed), len(changed), kept)

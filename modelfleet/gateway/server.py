"""One gateway worker: its client core, its socket, its signals and its drain.

The worker measures the fleet first (`AsyncModelServer.warm()`: a few seconds at most),
then listens, then prints one line saying where (scripts and the launcher wait for it,
or for `GET /livez`). SIGTERM or SIGINT closes the listening socket, lets the requests
and streams in flight finish for up to `drain_s`, cancels what is left (closing its
engine connections), closes the client core and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web
from prometheus_client import CollectorRegistry

from modelfleet.client.core import AsyncModelServer
from modelfleet.config import FleetConfig, GatewaySpec
from modelfleet.errors import UsageError
from modelfleet.gateway.app import Gateway
from modelfleet.gateway.auth import KeyCheck

log = logging.getLogger("modelfleet.gateway")


def run_worker(config: FleetConfig, spec: GatewaySpec, keys: tuple[bytes, ...], *,
               reuse_port: bool = False) -> int:
    """Serve until SIGTERM / SIGINT; the exit code (0 after a drain).

    On uvloop where it is installed (the `gateway` extra): a relayed request is mostly
    socket and event-loop work, which uvloop does in C (about a tenth less CPU per request
    in bench/README.md's "Gateway"); the stock loop otherwise, with the same behaviour."""
    main = serve(config, spec, keys, reuse_port=reuse_port)
    try:
        from uvloop import run  # (0.18 and later)
    except ImportError:
        log.info("uvloop is not installed: on the stock event loop "
                 "(pip install 'modelfleet[gateway]' for more requests per second)")
        return asyncio.run(main)
    return run(main)


async def serve(config: FleetConfig, spec: GatewaySpec, keys: tuple[bytes, ...], *,
                reuse_port: bool = False, stop: asyncio.Event | None = None) -> int:
    """The worker on the running loop; `stop` (else SIGTERM / SIGINT) starts the drain."""
    stop = stop or _on_signals()  # before anything: a signal while measuring stops it too
    registry = CollectorRegistry()
    fleet = AsyncModelServer(config=config, metrics=registry)
    runner: web.AppRunner | None = None
    try:
        await fleet.warm()
        if stop.is_set():
            return 0
        gateway = Gateway(fleet, config, spec, KeyCheck(keys), registry)
        runner = web.AppRunner(gateway.app(), handler_cancellation=True,
                               shutdown_timeout=spec.drain_s, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, spec.host, spec.port, backlog=1024,
                           reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {spec.host}:{spec.port}: "
                             f"{exc.strerror or exc}") from None
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        print(f"modelfleet gateway: listening on http://{host}:{site.port} "
              f"({len(config.models)} models, {len(keys)} API keys)", flush=True)
        await stop.wait()
        log.info("stopping: no new connections; draining requests in flight for up to %g s",
                 spec.drain_s)
    finally:
        if runner is not None:
            await runner.cleanup()  # stops listening, waits up to drain_s, cancels the rest
        await fleet.close()
    return 0


def _on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def setup_logging(access_log: bool) -> None:
    """Status and access lines on stderr (stdout carries the one `listening` line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines())
    for name, level in (("modelfleet.gateway", logging.INFO), ("modelfleet", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    if not access_log:
        logging.getLogger("modelfleet.gateway.access").setLevel(logging.WARNING)


class _Lines(logging.Formatter):
    """`time name message`, the time formatted once a second, not once a line: with an
    access line per request, formatting the time was a large part of a line's cost."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(message)s", "%Y-%m-%d %H:%M:%S")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:  # (the handler's lock is held: one line at a time)
            self._stamp = super().formatTime(record, datefmt)
            self._second = second
        return self._stamp

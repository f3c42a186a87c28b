"""A DNS server on loopback whose records a test or the bench sets, for `discover: {dns: ...}`.

Built on dnslib (a test and bench dependency: `pip install -e '.[test]'`), a DNS
implementation of its own, so the client's resolver (dnspython) is checked against
another side of the wire protocol, not against itself. It answers UDP queries for the
names it was given: A, AAAA and SRV records (with the targets' addresses in the
additional section, as CoreDNS sends them); a name it does not know is NXDOMAIN, a
known name without records of the asked type an empty NOERROR answer.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from typing import Any

from modelfleet.testing import HOST

try:
    from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
    from dnslib.server import BaseResolver, DNSLogger, DNSServer
except ImportError as exc:  # pragma: no cover - said plainly where it is missing
    raise ImportError("modelfleet.testing_dns needs dnslib: pip install -e '.[test]'") from exc


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."


class _Records(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.addresses: dict[str, tuple[str, ...]] = {}
        self.srv: dict[str, tuple[tuple[str, int], ...]] = {}
        self.ttl = 1
        self.queries = 0

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = _fqdn(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries += 1
            if name not in self.addresses and name not in self.srv:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            if qtype in ("A", "AAAA"):
                for rr in self._address_records(name, qtype):
                    reply.add_answer(rr)
            elif qtype == "SRV":
                for target, port in self.srv.get(name, ()):
                    reply.add_answer(RR(name, QTYPE.SRV, ttl=self.ttl,
                                        rdata=SRV(priority=0, weight=10, port=port, target=target)))
                    for kind in ("A", "AAAA"):
                        for rr in self._address_records(_fqdn(target), kind):
                            reply.add_ar(rr)
        return reply

    def _address_records(self, name: str, qtype: str) -> list[Any]:
        version = 4 if qtype == "A" else 6
        return [RR(name, getattr(QTYPE, qtype), ttl=self.ttl,
                   rdata=A(address) if version == 4 else AAAA(address))
                for address in self.addresses.get(name, ())
                if ipaddress.ip_address(address).version == version]


class LocalDns:
    """An authoritative DNS server on `host` (UDP), in a thread; `nameserver` is what
    `discover: {nameserver: ...}` takes. `stop()` closes its socket (lookups are then
    refused), `start()` opens it again on the same port."""

    def __init__(self, host: str = HOST, port: int = 0, *, ttl: int = 1) -> None:
        self.host = host
        self.port = port
        self._records = _Records()
        self._records.ttl = ttl
        self._server: Any = None

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> int:
        """Queries answered so far (to wait for the client's next lookup)."""
        with self._records.lock:
            return self._records.queries

    def set_addresses(self, name: str, addresses: Iterable[str]) -> None:
        """`name`'s A/AAAA records (an empty list: the name exists with none)."""
        with self._records.lock:
            self._records.addresses[_fqdn(name)] = tuple(addresses)

    def set_srv(self, name: str, targets: Iterable[tuple[str, int]]) -> None:
        """`name`'s SRV records: (target host name, port) each."""
        with self._records.lock:
            self._records.srv[_fqdn(name)] = tuple(targets)

    def forget(self, name: str) -> None:
        """`name` no longer exists (NXDOMAIN)."""
        with self._records.lock:
            self._records.addresses.pop(_fqdn(name), None)
            self._records.srv.pop(_fqdn(name), None)

    def start(self) -> LocalDns:
        if self._server is None:
            quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data",
                              prefix=False)
            self._server = DNSServer(self._records, address=self.host, port=self.port,
                                     logger=quiet)
            self.port = self._server.server.server_address[1]
            self._server.start_thread()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.server.shutdown()
            self._server.server.server_close()
            self._server = None

    def __enter__(self) -> LocalDns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lookup_once(nameserver: str, name: str, qtype: str = "A") -> DNSRecord:
    """One query, as dig would send it (for tests of the server itself)."""
    host, port = nameserver.rsplit(":", 1)
    return DNSRecord.parse(DNSRecord.question(name, qtype).send(host, int(port), timeout=2))

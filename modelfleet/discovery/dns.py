"""Servers from DNS: every A/AAAA record of a name (at one port), or the targets of SRV records.

A Kubernetes headless Service, Consul's DNS interface or a plain zone all answer
so. The name is looked up again every `every_s`, sooner when the records' TTL says
they may change sooner (but not more often than once a second, so a TTL of 0 cannot
make a busy loop). A lookup that fails yields a Snapshot with `error` set; an answer
with no records (NXDOMAIN, no A/AAAA) yields an empty one: the client keeps its
last known-good set either way.

SRV priority and weight are not used: every target is a server, and the router
weighs servers by what it measures of them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset

from modelfleet.config.schema import DiscoverSpec
from modelfleet.discovery.base import Source
from modelfleet.discovery.snapshot import Snapshot

MIN_INTERVAL_S = 1.0  # a short TTL shortens the wait down to this, not below
LOOKUP_LIFETIME_S = 3.0  # one lookup (with its retries) gives up after this
_EMPTY = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


class _Empty(Exception):
    """The name has no records of this type."""


class DnsSource(Source):
    """`discover: {dns: NAME, port: P}` or `discover: {dns_srv: _http._tcp.NAME}`."""

    def __init__(self, spec: DiscoverSpec) -> None:
        if spec.dns is None and spec.dns_srv is None:
            raise ValueError("a DnsSource needs dns or dns_srv")
        self._spec = spec
        self._resolver = _resolver(spec.nameserver, min(LOOKUP_LIFETIME_S, max(spec.every_s, 1.0)))

    def describe(self) -> str:
        spec = self._spec
        what = f"dns srv {spec.dns_srv}" if spec.dns_srv else f"dns {spec.dns}:{spec.port}"
        return f"{what} via {spec.nameserver}" if spec.nameserver else what

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        source = self.describe()
        while True:
            ttl: float | None = None
            try:
                servers, ttl = await self.lookup()
                snapshot = Snapshot(ready=tuple(sorted(servers)), source=source)
            except Exception as exc:  # any failure is reported, and looking goes on
                snapshot = Snapshot(ready=(), error=_why(exc), source=source)
            yield snapshot
            await asyncio.sleep(self.delay(ttl))

    def delay(self, ttl: float | None) -> float:
        """Seconds until the next lookup: every_s, or the TTL when sooner (>= 1 s)."""
        every = self._spec.every_s
        if ttl is None:
            return every
        return max(min(every, ttl), min(every, MIN_INTERVAL_S))

    async def lookup(self) -> tuple[set[tuple[str, int]], float | None]:
        """The servers the records name now, and the shortest TTL among them (None: no
        records). Raises on a failed lookup; no records is an empty set, not an error."""
        spec = self._spec
        if spec.dns_srv is not None:
            return await self._srv(spec.dns_srv)
        assert spec.dns is not None and spec.port is not None
        addresses, ttl = await self._addresses(spec.dns)
        return {(address, spec.port) for address in addresses}, ttl

    async def _srv(self, name: str) -> tuple[set[tuple[str, int]], float | None]:
        try:
            answer = await self._resolver.resolve(name, "SRV")
        except _EMPTY:
            return set(), None
        records = [(r.target.to_text(), r.port) for r in answer if r.target.to_text() != "."]
        known = _additional(answer.response.additional)  # most servers send the targets' A/AAAA
        ttls: list[float] = [answer.rrset.ttl] if answer.rrset is not None else []
        missing = sorted({target for target, _ in records if target not in known})
        looked = await asyncio.gather(*(self._addresses(target) for target in missing))
        for target, (addresses, ttl) in zip(missing, looked, strict=True):
            known[target] = addresses
            if ttl is not None:
                ttls.append(ttl)
        servers = {(address, port) for target, port in records for address in known.get(target, ())}
        return servers, min(ttls) if servers and ttls else None

    async def _addresses(self, name: str) -> tuple[set[str], float | None]:
        """A and AAAA records of `name` (asked at once): one kind failing while the other
        answers is the other's answer; both failing is the failure."""
        results = await asyncio.gather(self._records(name, "A"), self._records(name, "AAAA"),
                                       return_exceptions=True)
        addresses: set[str] = set()
        ttls: list[float] = []
        failures: list[BaseException] = []
        for result in results:
            if isinstance(result, _Empty):
                continue
            if isinstance(result, BaseException):
                failures.append(result)
                continue
            found, ttl = result
            addresses |= found
            ttls.append(ttl)
        if failures and not addresses:
            raise failures[0]
        return addresses, min(ttls) if ttls else None

    async def _records(self, name: str, kind: str) -> tuple[set[str], float]:
        try:
            answer = await self._resolver.resolve(name, kind)
        except _EMPTY:
            raise _Empty(name) from None
        return {r.address for r in answer}, float(answer.rrset.ttl if answer.rrset else 0)


def _resolver(nameserver: str | None, lifetime: float) -> dns.asyncresolver.Resolver:
    """The system's resolver, or one that asks only `nameserver` (IP, IP:PORT, [v6]:PORT)."""
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        host, port = _split(nameserver)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    resolver.cache = None  # the TTL is honoured here, by when it looks again
    return resolver


def _split(nameserver: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", nameserver) or \
        re.fullmatch(r"([0-9.]+)(?::(\d+))?", nameserver)
    if m is None:
        return nameserver, 53  # a bare IPv6 address
    return m.group(1), int(m.group(2) or 53)


def _additional(rrsets: Iterable[dns.rrset.RRset]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for rrset in rrsets:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found.setdefault(rrset.name.to_text(), set()).update(r.address for r in rrset)
    return found


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        return "no answer from the DNS server (timed out)"
    if isinstance(exc, dns.resolver.NoNameservers):
        return f"no DNS server answered ({exc})"
    if isinstance(exc, dns.exception.DNSException):
        return f"DNS lookup failed: {exc}"
    return f"DNS lookup failed ({type(exc).__name__}: {exc})"

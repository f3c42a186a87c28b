"""The discovery seam: a Source yields Snapshots of a model's servers; the client applies them.

A source knows one way of finding servers (DNS records, a Kubernetes Service's
EndpointSlices) and nothing of routing; the client (client/discovered.py) knows
nothing of DNS or Kubernetes. `source_for` picks the source a `discover:` entry
names, importing its module only then (so the kubernetes client library is needed
only by fleets that use it).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelfleet.config.schema import DiscoverSpec
    from modelfleet.discovery.snapshot import Snapshot


class Source(abc.ABC):
    """Where one model's servers are found."""

    @abc.abstractmethod
    def snapshots(self) -> AsyncIterator[Snapshot]:
        """An endless async iterator: a full Snapshot whenever the set may have changed,
        and one with `error` set after each failed lookup. Cancel the task iterating
        it to stop (the source closes what it opened)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the servers come from, in a few words ("dns llama.fleet.svc:8000")."""


def source_for(spec: DiscoverSpec) -> Source:
    """The source a model's `discover:` entry names."""
    if spec.kubernetes is not None:
        from modelfleet.discovery.kubernetes import KubernetesSource

        return KubernetesSource(spec.kubernetes)
    from modelfleet.discovery.dns import DnsSource

    return DnsSource(spec)

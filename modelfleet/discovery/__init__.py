"""Finding a model's servers instead of listing them: `discover:` in the fleet file.

  snapshot.py    Snapshot: the servers one look saw (ready, draining, or an error)
  base.py        Source: an endless stream of Snapshots; source_for(DiscoverSpec)
  dns.py         A/AAAA or SRV records, re-resolved every every_s (sooner by TTL)
  kubernetes.py  a Service's EndpointSlices: listed, watched, relisted

The client applies snapshots to its routes (modelfleet/client/discovered.py).
"""

from modelfleet.discovery.base import Source, source_for
from modelfleet.discovery.snapshot import Snapshot

__all__ = ["Snapshot", "Source", "source_for"]

"""The launcher: starts and supervises the servers of the fleet file that belong to this host.

`python serve_pipeline.py` and `modelfleet serve` both end in `launcher.run`.
Modules, one concept each: `gpus` (free GPU memory, from NVML or a described
file), `hosts` (which servers are mine), `memory` (memory fractions and which
starts share a GPU), `commands` (argv and environment per backend), `guard`
(the per-server process that keeps engines from outliving the launcher),
`supervisor` (the per-server state machine), `cli` (flags and wiring).
The launcher uses `modelfleet`'s config and never the client.
"""

from launcher.cli import run

__all__ = ["run"]

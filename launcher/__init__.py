"""The launcher: starts and supervises the servers of the fleet file that belong to this host.

It lives in the repository's top-level `launcher/` folder but is installed as
`modelfleet.launcher` (see setup.py): a top-level package named `launcher` in
site-packages would clash with any other of that name. Its own imports are
relative for that reason. `python serve_pipeline.py` and `modelfleet serve`
both end in `modelfleet.launcher.run`.
Modules, one concept each: `gpus` (free GPU memory, from NVML or a described
file), `hosts` (which servers are mine), `memory` (memory fractions and which
starts share a GPU), `commands` (argv and environment per backend), `guard`
(the per-server process that keeps engines from outliving the launcher),
`supervisor` (the per-server state machine), `cli` (flags and wiring).
The launcher uses `modelfleet`'s config and never the client.
"""

from .cli import run

__all__ = ["run"]

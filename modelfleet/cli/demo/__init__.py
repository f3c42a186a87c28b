"""`modelfleet demo`: the whole system at work on a laptop, in about thirty seconds.

It starts the simulated fleet of the fleet file through the real launcher
(`modelfleet serve`, as a subprocess, exactly as an operator would), sends
traffic through `AsyncModelServer`, and while the traffic runs it makes one
chat server ten times slower (`POST /sim/fault`) and later kills another
(SIGKILL; the launcher restarts it). The live view shows where the requests
go, so the traffic can be seen leaving the slow server and the dead one with
no failed request. At the end it prints the report, stops the launcher and
checks that no process it started is left.

Nothing here is faked: the only simulated thing is the engine, and it says so.

Modules: `fleet` (which fleet file, which ports, which servers to break; the launcher
as a subprocess), `record` (what happened), `traffic` (requests and faults on one event
loop), `view` (the live view and the phase table), `run` (the story from start to end).
"""

DEFAULT_DURATION_S = 30.0  # here, so that `modelfleet demo --help` need not import the rest

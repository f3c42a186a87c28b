"""`python -m bench.overhead`: modelfleet's per-request cost against raw aiohttp, alone.

The entry point issue 4 names: the same measurement as `python -m bench --scenario overhead`
(bench/scenarios/overhead.py holds it), printed with its command. Other `python -m bench`
options pass through, e.g. `python -m bench.overhead --quick --no-plots`.
"""

from __future__ import annotations

import sys

from bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--scenario", "overhead", *sys.argv[1:]]))

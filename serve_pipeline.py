"""Start and supervise this host's model servers: `python serve_pipeline.py [-c FILE] [--dry-run] ...`.

Thin on purpose: everything lives in the `launcher` package (`modelfleet serve` is the same command).
"""

import sys

from launcher import run

if __name__ == "__main__":
    sys.exit(run())

"""Start and supervise this host's model servers: `python serve_pipeline.py [-c FILE] [--dry-run] ...`.

Thin on purpose: everything lives in `modelfleet.launcher` (the repository's `launcher/`
folder, installed under the modelfleet namespace); `modelfleet serve` is the same command.
"""

import sys

from modelfleet.launcher import run

if __name__ == "__main__":
    sys.exit(run())

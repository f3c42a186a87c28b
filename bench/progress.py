"""Progress lines while the bench runs, on stderr so stdout stays the tables.

A full run takes minutes; one line per step (with the elapsed time) says where it is and
whether something is stuck, without a progress-bar library.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stream=sys.stderr, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self, text: str) -> None:
        if self.quiet:
            return
        minutes, seconds = divmod(int(self.elapsed()), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {text}", file=self.stream, flush=True)

"""The chaos soak (issue 15), 20 s of it: faults rotating over four sims while eight callers
ask for whole answers and streams. No caller may see an error (every text is checked
against the sims' known reply), and the client's file descriptors and asyncio tasks must
not grow with the run. The full soak and its numbers: bench/README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_twenty_seconds_of_chaos_cost_the_callers_nothing(tmp_path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--scenario", "chaos", "--duration", "20", "--no-plots",
         "--seed", "7", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["scenarios"]["chaos"]["results"]
    assert result["errors"] == 0, (result["error_kinds"], result["first_error"])
    assert result["served"] > 100 and result["whole"] > 0 and result["streams"] > 0
    assert set(result["faults"]) == {"hang", "500 on half", "10x slower",
                                     "disconnect after 3 tokens", "SIGKILL"}
    # flat: the last quarter of the run holds about what the first did
    assert result["growth"]["open file descriptors"] <= 16, result["growth"]
    assert result["growth"]["asyncio tasks"] <= 8, result["growth"]
    assert len(result["samples"]) >= 40
    assert "| requests served |" in proc.stdout and "| open file descriptors |" in proc.stdout

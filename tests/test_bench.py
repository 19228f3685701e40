"""The benchmark script runs, in its quick mode (numbers are read from its report, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_mode_writes_its_report_and_chart(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--no-overhead", "--tasks", "--scenarios", "SIGKILL",
         "--components", "scheduler", "--limit", "20", "--no-probes", "--no-celery", "--no-worker",
         "--no-flood", "--outages", "--start-methods", "--heal", "--no-api-server", "--memory", "scheduler",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "latest.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| SIGKILL |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[8] == "0", row  # safe: no orphans after SIGKILL
    assert cells[4] != "0", row  # stock: the children survive it
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    # Memory: both whole trees read, ours with one process more than stock's (the parent) at least.
    row = next(line for line in report.splitlines() if line.startswith("| scheduler |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 50 and float(cells[3]) > 50 and 0 < float(cells[4]) < 32, row
    stock_procs, safe_procs = (int(float(n)) for n in cells[8].split("/"))
    assert safe_procs >= stock_procs + 1, row

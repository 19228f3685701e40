"""What every bench section shares: one migrated PostgreSQL template per run, a fresh deployment on
a clone of it per measurement, the safe commands' flags, and how a process tree is timed and read.

The deployments, servers and faults are the tests' own (``tests/harness``): the bench measures
what the tests check.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# This process imports Airflow too (through the harness): keep its airflow.cfg out of ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="safe-scheduler-bench-home-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)

from harness import pg  # noqa: E402
from harness.deployment import PYTHON, Deployment, base_env  # noqa: E402
from harness.procs import threads_of  # noqa: E402

SAFE_ARGS = ["--shutdown-timeout", "10", "--child-stop-timeout", "3", "--stall-timeout", "10"]
COMPONENTS = ("scheduler", "triggerer", "dag-processor")


class Lab:
    """The run's PostgreSQL template, and a deployment on a clone of it for each measurement."""

    def __init__(self, root: Path) -> None:
        self.root = root
        home = root / "template-home"
        home.mkdir()
        print("building the migrated PostgreSQL template ...", flush=True)
        self.template = pg.make_template(root, base_env(home), PYTHON)

    def deployment(self) -> tuple[Deployment, pg.PgServer]:
        work = Path(tempfile.mkdtemp(prefix="run-", dir=self.root))
        work.chmod(0o755)
        server = pg.clone(self.template, work / "data")
        server.start()
        return Deployment(work / "airflow", server.url), server


def safe_args(stock: bool) -> list[str]:
    return [] if stock else SAFE_ARGS


def gone(scheduler, started: float, limit: float) -> tuple[int | None, float | None]:
    """Exit code, and seconds from ``started`` until the whole tree (the scheduler and every process
    it forked) is gone; None for the seconds if that did not happen within ``limit``."""
    code = scheduler.wait_exit(limit)
    while scheduler.survivors() and time.monotonic() - started < limit:
        time.sleep(0.05)
    took = time.monotonic() - started
    return code, (took if code is not None and not scheduler.survivors() else None)


def cmdline(proc: psutil.Process) -> str:
    """The first three words of its command line; "" once it has gone."""
    try:
        return " ".join(proc.cmdline()[:3])
    except psutil.Error:
        return ""


def cpu(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def ours(pid: int) -> list[float]:
    """CPU seconds used so far by each of the job process's ``safe-…`` threads."""
    return [seconds for name, seconds in threads_of(pid).values() if name.startswith("safe-")]


#: Student's t at 97.5 % for n - 1 degrees of freedom (n = 2 … 16): a 95 % interval of a mean.
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13}


def ratios(label: str, values: list[float]) -> str:
    """One line on per-pair ratios: their mean with its 95 % interval (what more pairs narrow: the
    claim), their median and their range (the spread of single pairs, which more pairs do not
    narrow)."""
    values = sorted(values)
    if not values:
        return f"* {label}: no pair"
    mean = statistics.fmean(values)
    line = f"* {label}, safe / stock per pair, {len(values)} pairs: mean {mean:.3f}"
    if len(values) > 1:
        half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
        line += f" (95 % interval {mean - half:.3f} … {mean + half:.3f}, ± {100 * half / mean:.1f} %)"
    return line + (f"; median {statistics.median(values):.3f}; single pairs {values[0]:.3f} … {values[-1]:.3f}")


def fmt(value: float | None, limit: float) -> str:
    return f"never (> {limit:g} s)" if value is None else f"{value:.1f}"


def interleaved(reps: int, measure, label: str, kinds: tuple[str, ...] = ("stock", "safe")) -> dict[str, list]:
    """``measure(kind)`` ``reps`` times for each kind, in turn, so that drift hits every kind alike;
    the order flips at each repetition, so that going second (a warmer machine) does too."""
    runs: dict[str, list] = {kind: [] for kind in kinds}
    for rep in range(reps):
        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
            result = measure(kind)
            runs[kind].append(result)
            print(f"{label} [{kind} {rep + 1}/{reps}]: {result}", flush=True)
    return runs

"""Heal time: how soon the work in flight is back after a fault, stock vs safe.

16 task instances run (one DAG run, 16 tasks of 30 s, ``retries=2``, ``retry_delay=5s``) under a
LocalExecutor scheduler on PostgreSQL (Airflow 3: with a real api-server and dag-processor). 10 s
into the tasks a fault comes; "heal" is the seconds from the fault until each task instance is
``success`` in the database (its median and maximum over the 16). Both commands run with their
defaults. A restart comes 10 s after the process is gone, as the kubelet's first one does. A double
run is two tries of one task instance whose runs overlapped (each try marks its start and its end).
"""

from __future__ import annotations

import signal
import statistics
import textwrap
import threading
import time

from harness.procs import wait_for
from lab import Lab, interleaved

TASKS, SECONDS, INTO, RESTART = 16, 30, 10.0, 10.0
FAULTS = ("kill -9, restarted", "two schedulers, kill -9 of one", "the container's end, restarted",
          "the database stopped for 60 s")
HEAL_DAG = """
    import os
    import time
    from datetime import datetime, timedelta

    try:
        from airflow.sdk import DAG, BaseOperator
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.models import BaseOperator


    class Work(BaseOperator):
        def execute(self, context):
            with open(os.path.join({marks!r}, self.task_id), "a") as runs:
                runs.write(f"start {{os.getpid()}} {{time.time()}}\\n")
            time.sleep({seconds})
            with open(os.path.join({marks!r}, self.task_id), "a") as runs:
                runs.write(f"done {{os.getpid()}} {{time.time()}}\\n")


    with DAG("heal", schedule="@once", start_date=datetime(2026, 1, 1), catchup=False,
             default_args={{"retries": 2, "retry_delay": timedelta(seconds=5)}}):
        for n in range({tasks}):
            Work(task_id=f"t{{n:02d}}")
"""


def _overlaps(marks) -> int:
    """Task instances two of whose tries ran at once (a later try began before an earlier one ended)."""
    found = 0
    for path in marks.iterdir():
        tries = {}
        for line in path.read_text().splitlines():
            kind, pid, at = line.split()
            tries.setdefault(pid, {})[kind] = float(at)
        spans = sorted((t["start"], t.get("done")) for t in tries.values() if "start" in t)
        found += any(done is not None and later < done for (_, done), (later, _) in zip(spans, spans[1:]))
    return found


class _Restarter:
    """Starts the command again ``RESTART`` seconds after it is gone, as often as it goes."""

    def __init__(self, start) -> None:
        self.start, self.current, self.started = start, start(), 1
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.current.popen.poll() is not None and not self._stop.wait(RESTART):
                self.current, self.started = self.start(), self.started + 1
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()


def heal_once(lab: Lab, fault: str, stock: bool, limit: float) -> dict:
    dep, server = lab.deployment()
    restarter = None
    try:
        marks = dep.home.parent / "marks"
        marks.mkdir()
        (dep.home / "dags" / "heal.py").write_text(
            textwrap.dedent(HEAL_DAG.format(marks=str(marks), seconds=SECONDS, tasks=TASKS)))
        dep.env.pop("AIRFLOW__CORE__PARALLELISM")  # Airflow's 32: all 16 run at once
        dep.env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
        dep.start_task_services()
        first = dep.scheduler(stock=stock)
        if fault.startswith("two"):
            dep.scheduler(stock=stock)
        wait_for(lambda: len(list(marks.iterdir())) == TASKS, 300, interval=0.5, message="16 tasks to run")
        time.sleep(INTO - 1)  # the last one started about a second ago
        at = time.time()
        if fault.startswith(("kill", "two")):
            first.signal(signal.SIGKILL)
        elif fault.startswith("the container"):
            for watcher in first.watchers:
                watcher.freeze()
                watcher.kill_survivors()
        if fault.startswith(("kill", "the container")):
            time.sleep(RESTART)
            dep.scheduler(stock=stock)
        elif fault.startswith("the database"):
            restarter = _Restarter(lambda: dep.scheduler(stock=stock))
            server.stop("immediate")
            time.sleep(60)
            server.start()

        def ends() -> list[float]:
            return [row[0] for row in server.execute(
                "SELECT extract(epoch FROM end_date) FROM task_instance WHERE dag_id = 'heal' AND state = 'success'")]

        wait_for(lambda: len(ends()) == TASKS or time.time() - at > limit, limit + 60, interval=1.0)
        healed = sorted(float(end) - at for end in ends())
        return {"healed": len(healed), "median": statistics.median(healed) if healed else None,
                "max": healed[-1] if len(healed) == TASKS else None, "overlaps": _overlaps(marks),
                "tries": sum(len([ln for ln in p.read_text().splitlines() if ln.startswith("start")])
                             for p in marks.iterdir()),
                "restarts": restarter.started - 1 if restarter else None}
    finally:
        if restarter is not None:
            restarter.stop()
        dep.cleanup()
        server.destroy()


def measure(lab: Lab, args) -> dict:
    return {fault: interleaved(args.reps, lambda kind: heal_once(lab, fault, kind == "stock", args.heal_limit),
                               f"heal, {fault}") for fault in args.heal}


def table(heals: dict, args) -> list[str]:
    import airflow

    lines = ["", f"## Heal time after a fault (Airflow {airflow.__version__}; seconds from the fault until each "
             f"of {TASKS} task instances is success: median / max; {args.reps} repetition(s), worst shown)", "",
             "16 tasks of 30 s running, the fault 10 s into them, a restart 10 s after the process is gone. Both "
             "commands with their defaults. \"Tries\" counts the tries started (16 when every task finished its "
             "first); a double run is two tries of one task instance that ran at once.", "",
             "| fault | stock | safe | tries, stock / safe | double runs, stock / safe |",
             "| --- | --- | --- | --- | --- |"]

    def cell(run: dict) -> str:
        if run["median"] is None:
            return f"never (> {args.heal_limit:g} s)"
        most = f"{run['max']:.1f}" if run["max"] is not None else f"> {args.heal_limit:g} ({run['healed']} healed)"
        return f"{run['median']:.1f} / {most}"

    for fault, runs in heals.items():
        worst = {kind: max(runs[kind], key=lambda r: (r["max"] is None, r["max"] or 0.0)) for kind in runs}
        lines.append(f"| {fault} | {cell(worst['stock'])} | {cell(worst['safe'])} | "
                     f"{worst['stock']['tries']} / {worst['safe']['tries']} | "
                     f"{max(r['overlaps'] for r in runs['stock'])} / {max(r['overlaps'] for r in runs['safe'])} |")
    return lines

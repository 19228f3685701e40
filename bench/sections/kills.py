"""kill -9 under each start method: what is left of the tree once the PID the user started, the job
process, or both at once (``pkill -9 -f``) are killed, stock vs safe."""

from __future__ import annotations

import time

from harness.components import started_component, wait_parsing, with_parsing_process
from harness.faults import kill, running_tasks, with_running_tasks
from lab import Lab, cmdline, interleaved, safe_args

#: multiprocessing's start methods; 2.x reads ``[core] mp_start_method`` only for its DAG processor.
START_METHODS = ("fork", "forkserver", "spawn")
#: Each column: what is killed (``harness.faults.kill``'s target), and whether it is stock.
TARGETS = {"stock": ("top", True), "safe top": ("top", False), "safe job": ("job", False),
           "safe both": ("both", False)}


def kill_by_method(lab: Lab, component: str, method: str, target: str, stock: bool, wait: float) -> dict:
    """``kill -9`` with ``[core] mp_start_method`` set to ``method``. The scheduler has two
    LocalExecutor tasks running, the triggerer its serve-logs, the dag-processor a parsing process.
    How many of the processes the tree ever held are still alive once none are left or ``wait``
    seconds have passed, and when the last one went."""
    dep, server = lab.deployment()
    try:
        dep.env["AIRFLOW__CORE__MP_START_METHOD"] = method
        if component == "scheduler":
            marks = dep.home.parent / "marks"
            with_running_tasks(dep, marks)
            proc = dep.scheduler(*safe_args(stock), stock=stock)
            running_tasks(proc, marks)
        else:
            if component == "dag-processor":
                with_parsing_process(dep)
            proc = started_component(dep, server, component, *safe_args(stock), stock=stock)
            if component == "dag-processor":
                wait_parsing(proc)
        seen = len(proc.survivors())
        killed = time.monotonic()
        kill(proc, target)
        left = proc.survivors_after(max(0.0, wait - (time.monotonic() - killed)))
        return {"seen": seen, "left": len(left), "seconds": None if left else time.monotonic() - killed,
                "left_names": sorted(filter(None, (cmdline(p)[:60] for p in left)))}
    finally:
        dep.cleanup()
        server.destroy()


def measure(lab: Lab, args) -> dict:
    kills: dict = {}
    for component in args.components:
        for method in args.start_methods:
            kills[(component, method)] = interleaved(
                args.reps, lambda kind: kill_by_method(lab, component, method, *TARGETS[kind], args.kill_wait),
                f"kill -9, {component}, {method}", kinds=tuple(TARGETS))
    return kills


def table(kills: dict, args) -> list[str]:
    lines = ["", f"## kill -9 under each start method (processes still alive {args.kill_wait:g} s after the kill, "
             "of all there were below the PID the user started; worst of the repetitions)", "",
             "`[core] mp_start_method` set through `AIRFLOW__CORE__MP_START_METHOD`. The scheduler has two "
             "LocalExecutor tasks running (Airflow 3: with a real api-server and dag-processor beside it), the "
             "triggerer its serve-logs, the dag-processor a parsing process that never ends. Stock has one "
             "process for every target. \"Both\" is every process whose command line names the safe command, "
             "killed at once, as `pkill -9 -f airflow-safe-scheduler` does.", "",
             "| component | start method | stock, kill -9 | safe, kill -9 of the PID the user started | "
             "safe, kill -9 of the job process | safe, kill -9 of both at once |",
             "| --- | --- | --- | --- | --- | --- |"]

    def cell(runs: list[dict]) -> str:
        """Left of all there were below the killed PID, and when the last went (worst run)."""
        worst = max(runs, key=lambda r: (r["left"], r["seconds"] or 0.0))
        gone = f" (all gone after {worst['seconds']:.1f} s)" if worst["seconds"] is not None else ""
        return f"{worst['left']} of {worst['seen']}{gone}"

    for (component, method), runs in kills.items():
        lines.append(f"| {component} | {method} | " + " | ".join(cell(runs[kind]) for kind in TARGETS) + " |")
    left = sorted({name for runs in kills.values() for r in runs["stock"] for name in r["left_names"]})
    if left:
        lines += ["", "What stock left (command lines, first 60 characters): " + "; ".join(f"`{n}`" for n in left)]
    return lines


def to_json(kills: dict) -> dict:
    return {" / ".join(key): value for key, value in kills.items()}

"""Stop with tasks running: LocalExecutor tasks each started an external job (cancelled by
``on_termination`` when the task is stopped); then the DB is stopped or SIGTERM sent."""

from __future__ import annotations

import signal
import statistics
import time

from harness.external_job import write_dag
from harness.jobservice import JobService
from harness.procs import wait_for
from lab import Lab, fmt, gone, interleaved, safe_args


def stop_with_tasks(lab: Lab, tasks: int, fault: str, stock: bool, limit: float) -> dict:
    """Seconds until the whole tree is gone, exit code, and how many external jobs were cancelled
    (the cleanups that ran)."""
    dep, server = lab.deployment()
    service = JobService()
    try:
        write_dag(dep.home / "dags", service.url, tasks=tasks)
        dep.env.update(AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
                       AIRFLOW__CORE__PARALLELISM=str(max(4, tasks)))
        dep.start_task_services()
        scheduler = dep.scheduler(*safe_args(stock), stock=stock)
        wait_for(lambda: len(service.jobs) >= tasks, 300, interval=0.5, message=f"{tasks} jobs started")
        started = time.monotonic()
        if fault == "stop":
            server.stop("immediate")
        else:
            scheduler.signal(signal.SIGTERM)
        code, seconds = gone(scheduler, started, limit)
        cancelled = sum(1 for state in service.jobs.values() if state == "cancelled")
        return {"seconds": seconds, "code": code, "cancelled": cancelled, "jobs": tasks}
    finally:
        dep.cleanup()
        service.close()
        server.destroy()


def measure(lab: Lab, args) -> dict:
    stops: dict = {}
    for tasks in args.tasks:
        for fault, label in (("stop", "DB stopped"), ("sigterm", "SIGTERM")):
            name = f"{label}, {tasks} task(s) running"
            stops[name] = interleaved(
                args.reps, lambda kind: stop_with_tasks(lab, tasks, fault, kind == "stock", args.limit), name)
    return stops


def table(stops: dict, args) -> list[str]:
    lines = ["", "## Stop with tasks running (LocalExecutor; each task cancels its external job in "
             "`on_termination`)", "",
             "| scenario | stock median s | stock exit codes | stock jobs cancelled | safe median s | "
             "safe exit codes | safe jobs cancelled |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in stops.items():
        row = [name]
        for kind in ("stock", "safe"):
            secs = [r["seconds"] for r in runs[kind]]
            median = statistics.median(secs) if None not in secs else None
            cancelled = ", ".join(f"{r['cancelled']}/{r['jobs']}" for r in runs[kind])
            row += [fmt(median, args.limit), ", ".join(sorted({str(r["code"]) for r in runs[kind]})), cancelled]
        lines.append("| " + " | ".join(row) + " |")
    return lines

"""CeleryExecutor under a busy load through a real Redis and ``airflow celery worker``: throughput,
the scheduler's CPU per 1000 task instances, and the recovery after a broker outage."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import psutil

from harness.broker import RedisServer
from harness.celery import busy, failed, scheduler_up, succeeded
from harness.procs import wait_for
from lab import Lab, interleaved, ours, safe_args

#: Seconds after the broker's return over which the recovered work is counted.
AFTER_OUTAGE = 30.0


def celery(lab: Lab, stock: bool, warmup: float, window: float, outage: float) -> dict:
    """Task instances per second, the scheduler's CPU per 1000 of them, then the broker stopped for
    ``outage`` seconds and the seconds from its return to the next successful task instance (and
    how many task instances failed meanwhile)."""
    dep, server = lab.deployment()
    redis = RedisServer(dep.home.parent / "redis").start()
    try:
        dep.use_celery(redis)
        busy(dep, dags=4, tasks=4, seconds=0.5)
        scheduler = scheduler_up(dep, server, *safe_args(stock), stock=stock)
        wait_for(lambda: succeeded(server) >= 4, 300, interval=1, message="tasks through the worker")
        proc = psutil.Process(scheduler.job_pid)
        time.sleep(warmup)  # steady state first: the measurement window starts after this
        first, cpu, our_cpu = succeeded(server), sum(proc.cpu_times()[:2]), sum(ours(proc.pid))
        time.sleep(window)  # the measurement window
        done, cpu = succeeded(server) - first, sum(proc.cpu_times()[:2]) - cpu
        our_cpu = sum(ours(proc.pid)) - our_cpu  # our threads' share of ``cpu`` (0 for stock)
        failed_before = failed(server)
        redis.stop()
        time.sleep(outage)  # the outage itself
        before = succeeded(server)
        starting_wall = time.time()
        redis.start()  # returns once Redis answers: the worker may have connected just before
        back, back_wall = time.monotonic(), time.time()
        wait_for(lambda: succeeded(server) > before, 300, interval=0.05, message="a success after the outage")
        recovery = time.monotonic() - back
        # How much work the recovery does, not only how soon it starts: successes in the 30 s
        # after the broker's return (stock failed what was queued during the outage; ours holds it).
        time.sleep(max(0.0, back + AFTER_OUTAGE - time.monotonic()))
        done_after = succeeded(server) - before
        # The worker reconnects on its own backoff (2, 4, 6 ... s), the same for stock and safe,
        # then syncs with its peers ("mingle", ~1 s) before it takes a task: the scheduler's
        # share is whatever the first task arrives after the worker is ready for it.
        worker_log = dep.home / "celery.log"
        reconnected = _worker_log_after(worker_log, starting_wall, "Connected to")
        ready = _worker_log_after(worker_log, starting_wall, "mingle: all alone")
        received = _worker_log_after(worker_log, starting_wall, "] received")
        lead = back_wall - starting_wall
        nan = float("nan")
        return {"tis_per_s": done / window, "cpu_s_per_1000": cpu * 1000 / max(done, 1),
                "cpu_s_per_min": cpu * 60 / window, "ours_cpu_s_per_min": our_cpu * 60 / window,
                "recovery_s": recovery,
                "after_worker_reconnect_s": recovery - max(0.0, reconnected - lead) if reconnected is not None else nan,
                "worker_ready_to_task_s": received - ready if received is not None and ready is not None else nan,
                f"succeeded_{AFTER_OUTAGE:g}s_after": done_after,
                "failed_in_outage": failed(server) - failed_before}
    finally:
        dep.cleanup()
        redis.stop()
        server.destroy()


def _worker_log_after(log: Path, since: float, needle: str) -> float | None:
    """Seconds from ``since`` (wall clock) to the worker's first log line holding ``needle`` after it."""
    import datetime
    import re

    for line in log.read_text(errors="replace").splitlines():
        if needle not in line:
            continue
        # Airflow 3's worker logs ISO UTC ("2026-12-01T22:23:47.701601Z"); Celery's own format, on
        # 2.x, is local time ("[2026-12-01 20:14:31,483: INFO/MainProcess]").
        stamp = re.search(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?)(Z?)", line)
        if stamp:
            at = datetime.datetime.fromisoformat(stamp.group(1).replace(",", "."))
            if stamp.group(2):
                at = at.replace(tzinfo=datetime.timezone.utc)
            if at.timestamp() >= since:
                return at.timestamp() - since
    return None


def measure(lab: Lab, args) -> dict:
    warmup, window, outage = (10, 30, 15) if args.quick else (20, 60, 20)
    return interleaved(args.reps, lambda kind: celery(lab, kind == "stock", warmup, window, outage), "celery")


def table(celery: dict, args) -> list[str]:
    lines = ["", "## CeleryExecutor (a real Redis broker and `airflow celery worker`, 4 DAGs x 4 tasks of 0.5 s; "
             "medians; ratio = safe / stock)", "", "| measure | stock | safe | ratio |", "| --- | --- | --- | --- |"]
    for key, label in (("tis_per_s", "throughput (TIs/s)"), ("cpu_s_per_1000", "scheduler CPU per 1000 TIs (s)"),
                       ("cpu_s_per_min", "scheduler CPU (s per minute)"),
                       ("ours_cpu_s_per_min", "of which our threads (s per minute)"),
                       ("recovery_s", "broker back → next successful TI (s)"),
                       ("after_worker_reconnect_s", "worker reconnected → next successful TI (s)"),
                       ("worker_ready_to_task_s", "worker ready → first task received (s): the scheduler's share"),
                       (f"succeeded_{AFTER_OUTAGE:g}s_after",
                        f"task instances succeeded in the {AFTER_OUTAGE:g} s after the broker's return"),
                       ("failed_in_outage", "task instances failed during the broker outage")):
        stock, safe = (statistics.median([r[key] for r in celery[kind] if key in r and r[key] == r[key]] or [math.nan])
                       for kind in ("stock", "safe"))
        ratio = f"{safe / stock:.3f}" if stock else "(stock: 0)"
        lines.append(f"| {label} | {stock:.3g} | {safe:.3g} | {ratio} |")
    pairs = list(zip(celery["stock"], celery["safe"]))  # run in pairs: stock, then safe
    lines.append("")
    for key, label in (("recovery_s", "broker back → next successful TI"),
                       ("after_worker_reconnect_s", "worker reconnected → next successful TI")):
        diffs = sorted(b[key] - a[key] for a, b in pairs if a[key] == a[key] and b[key] == b[key])
        if diffs:
            lines.append(f"* {label}, safe − stock per pair: median {statistics.median(diffs):+.3f} s, "
                         f"safe no later in {sum(d <= 0 for d in diffs)} of {len(diffs)} pairs "
                         f"(range {diffs[0]:+.3f} … {diffs[-1]:+.3f} s)")
    lines += ["", "Every sample (stock; safe): " + "; ".join(
        f"{k}: {[round(r[k], 3) for r in celery['stock']]} / {[round(r[k], 3) for r in celery['safe']]}"
        for k in celery["stock"][0])]
    return lines

"""Overhead on a healthy scheduler: start-up, idle RSS and CPU (ours and the parent's), and
scheduling throughput and CPU per 1000 task instances under load, stock vs safe."""

from __future__ import annotations

import os
import statistics
import textwrap
import time
from collections.abc import Callable

import psutil

from harness.deployment import Deployment
from harness.procs import stop, wait_for
from lab import Lab, cpu, ours, safe_args

OURS = "idle CPU of our threads (% of a core)"
PARENT_RSS = "idle RSS of our parent process alone (MB)"

LOAD_DAGS = """
    from datetime import datetime, timedelta
    from airflow.sdk import DAG
    from airflow.providers.standard.operators.empty import EmptyOperator

    for n in range({dags}):
        with DAG(f"load_{{n}}", schedule=timedelta(minutes=1), start_date=datetime(2026, 1, 1),
                 catchup=True, max_active_runs=16) as dag:
            for t in range({tasks}):
                EmptyOperator(task_id=f"t{{t}}")
        globals()[dag.dag_id] = dag
"""


def startup(lab: Lab, stock: bool) -> float:
    dep, server = lab.deployment()
    try:
        begun = time.monotonic()
        scheduler = dep.scheduler(*safe_args(stock), stock=stock)
        scheduler.wait_healthy()
        return time.monotonic() - begun
    finally:
        dep.cleanup()
        server.destroy()


def idle(lab: Lab, stock: bool, seconds: float) -> dict:
    """RSS and CPU of the scheduler process while it has nothing to do, and of our threads in it.

    Our threads carry ``safe-…`` kernel names (``safe_scheduler.threads``), so their share is
    read per thread from /proc; the stock scheduler has none, which reads as 0.
    """
    dep, server = lab.deployment()
    try:
        scheduler = dep.scheduler(*safe_args(stock), stock=stock)
        scheduler.wait_healthy()
        time.sleep(5)  # settle after start-up: this is a measurement window, not an assertion
        job = psutil.Process(scheduler.job_pid)
        # Ours: the job process and the tiny parent above it (``reaper``); stock: the one process.
        procs = [job] if stock else [job, psutil.Process(scheduler.pid)]
        before, ours_before = cpu(procs), sum(ours(job.pid))
        parent_before = 0.0 if stock else cpu(procs[1:])
        time.sleep(seconds)
        used, ours_now = cpu(procs) - before, ours(job.pid)
        parent_used = 0.0 if stock else cpu(procs[1:]) - parent_before
        if not stock and not ours_now:
            raise RuntimeError("no safe-… threads found in the safe scheduler: cannot measure their CPU")
        return {"rss_mb": sum(p.memory_info().rss for p in procs) / 2**20, "cpu_s_per_min": used * 60 / seconds,
                "ours_pct_core": (sum(ours_now) - ours_before) * 100 / seconds,
                "parent_rss_mb": 0.0 if stock else procs[1].memory_info().rss / 2**20,
                "parent_pct_core": parent_used * 100 / seconds}
    finally:
        dep.cleanup()
        server.destroy()


def throughput(lab: Lab, stock: bool, dags: int, tasks: int, warmup: float, window: float,
               during: Callable[[Deployment, psutil.Process, float], Callable[[], dict]] | None = None) -> dict:
    """Task instances the scheduler finishes per second while it never runs out of work, and the
    scheduler process's CPU seconds per 1000 of them (less sensitive to a noisy neighbour).

    EmptyOperator tasks are set to success by the scheduler itself, so this is scheduling work
    only (DAG runs created, dependencies checked, states written), no executor or task runtime.
    Catch-up over a year of one-minute intervals never runs dry, and with
    ``scheduler_idle_sleep_time = 0`` the loop never waits: both schedulers are CPU-bound for the
    whole window. The DAG processor is stopped once the DAGs are serialized so that it does not
    share the two cores with what we measure. ``during(deployment, job process, window)``, where
    given, starts something for the window and returns what to call after it for its figures.
    """
    dep, server = lab.deployment()
    dag_file = textwrap.dedent(LOAD_DAGS.format(dags=dags, tasks=tasks))
    (dep.home / "dags" / "load.py").write_text(dag_file)
    dep.env.update(
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="0",
    )
    try:
        processor = dep.airflow("dag-processor")
        wait_for(lambda: server.execute("SELECT count(*) FROM serialized_dag")[0][0] >= dags, 300,
                 interval=1, message="the DAGs to be parsed")
        stop(processor.popen, 30)
        scheduler = dep.scheduler(*safe_args(stock), stock=stock)
        scheduler.wait_healthy()
        count = "SELECT count(*) FROM task_instance WHERE state = 'success'"
        proc = psutil.Process(scheduler.job_pid)
        time.sleep(warmup)  # first DAG runs created; measurement starts in the steady state
        first, used = server.execute(count)[0][0], sum(proc.cpu_times()[:2])
        finish = during(dep, proc, window) if during else dict
        time.sleep(window)  # the measurement window
        done, used = server.execute(count)[0][0] - first, sum(proc.cpu_times()[:2]) - used
        if done == 0:
            raise RuntimeError(f"nothing was scheduled; see {dep.home}/scheduler-0.log")
        return {"tis_per_s": done / window, "cpu_s_per_1000": used * 1000 / done, **finish()}
    finally:
        dep.cleanup()
        server.destroy()


def measure(lab: Lab, args) -> dict:
    import airflow

    samples: dict[str, dict[str, list]] = {}
    dags, tasks, warmup, window = (10, 5, 5, 20) if args.quick else (50, 20, 15, 60)
    for rep in range(args.reps):
        for kind in ("stock", "safe"):  # interleaved, so drift hits both alike
            stock = kind == "stock"
            got = samples.setdefault(kind, {})
            got.setdefault("startup to first heartbeat (s)", []).append(startup(lab, stock))
            quiet = idle(lab, stock, args.idle_window)
            got.setdefault("idle RSS, scheduler and its parent (MB)", []).append(quiet["rss_mb"])
            got.setdefault(PARENT_RSS, []).append(quiet["parent_rss_mb"])
            got.setdefault("idle CPU of the parent (% of a core)", []).append(quiet["parent_pct_core"])
            got.setdefault("idle CPU (s per minute)", []).append(quiet["cpu_s_per_min"])
            got.setdefault(OURS, []).append(quiet["ours_pct_core"])
            loaded = throughput(lab, stock, dags, tasks, warmup, window)
            got.setdefault(f"throughput, {dags} DAGs x {tasks} tasks (TIs/s)", []).append(loaded["tis_per_s"])
            got.setdefault("scheduler CPU per 1000 TIs under load (s)", []).append(loaded["cpu_s_per_1000"])
            print(f"overhead [{kind} {rep + 1}/{args.reps}]: {({k: v[-1] for k, v in got.items()})}", flush=True)
    rows = {measure: (statistics.median(samples["stock"][measure]), statistics.median(samples["safe"][measure]))
            for measure in samples["stock"]}
    return {"airflow": airflow.__version__, "rows": rows,
            "samples": {m: {k: samples[k][m] for k in samples} for m in samples["stock"]}}


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def table(overhead: dict, args) -> list[str]:
    lines = ["", "## Overhead on a healthy scheduler (medians; ratio = safe / stock)", "",
             "| measure | stock | safe | ratio |", "| --- | --- | --- | --- |"]
    for measure, (stock, safe) in overhead["rows"].items():
        ratio = f"{safe / stock:.3f}" if stock else "(stock has none)"
        lines.append(f"| {measure} | {stock:.3g} | {safe:.3g} | {ratio} |")
    if OURS in overhead["rows"]:
        tick = 100 / os.sysconf("SC_CLK_TCK") / args.idle_window
        lines += ["", f"Our threads' CPU is read per thread from /proc in clock ticks: over one {args.idle_window:g} s "
                  f"idle window a single tick is {tick:.3f} % of a core, so 0 means less than that."]
    lines += ["", "Every sample (stock, then safe), in run order:", ""]
    for measure, kinds in overhead["samples"].items():
        lines.append(f"* {measure}: stock {_list(kinds['stock'])}; safe {_list(kinds['safe'])}")
    return lines

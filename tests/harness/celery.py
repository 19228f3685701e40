"""CeleryExecutor: busy DAGs whose tasks record every start themselves (and any second, simultaneous
run of the same task instance), counting what ran, and a scheduler that is up."""

from __future__ import annotations

import os
import textwrap

from harness.components import heartbeating
from harness.procs import wait_for

BUSY_DAGS = """
    import os
    import time
    from datetime import datetime, timedelta

    try:
        from airflow.sdk import DAG
        from airflow.providers.standard.operators.python import PythonOperator
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.operators.python import PythonOperator

    MARKS = {marks!r}


    def work(ti=None, **_):
        key = f"{{ti.dag_id}}.{{ti.task_id}}.{{ti.run_id}}.{{ti.map_index}}".replace(":", "_").replace("+", "_")
        running = os.path.join(MARKS, key + ".pid")
        try:
            with open(running) as f:
                other = int(f.read() or 0)
            os.kill(other, 0)
            with open(os.path.join(MARKS, "overlaps"), "a") as f:
                f.write(f"{{key}} {{other}} {{os.getpid()}}\\n")
        except (OSError, ValueError):
            pass
        with open(running, "w") as f:
            f.write(str(os.getpid()))
        with open(os.path.join(MARKS, "starts"), "a") as f:
            f.write(f"{{key}} {{os.getpid()}} {{time.time()}}\\n")
        time.sleep({seconds})


    for n in range({dags}):
        with DAG(f"busy_{{n}}", schedule=timedelta(minutes=1), start_date=datetime(2026, 1, 1),
                 catchup=True, max_active_runs=2) as dag:
            for t in range({tasks}):
                PythonOperator(task_id=f"t{{t}}", python_callable=work)
        globals()[dag.dag_id] = dag
"""


def busy(dep, dags: int = 2, tasks: int = 3, seconds: float = 2, worker: bool = True) -> os.PathLike:
    """Busy DAGs (catch-up that never runs dry), unpaused, and (unless ``worker`` is False) a stock
    worker; returns the marks dir."""
    marks = dep.home / "marks"
    marks.mkdir()
    (dep.home / "dags" / "busy.py").write_text(
        textwrap.dedent(BUSY_DAGS.format(marks=str(marks), dags=dags, tasks=tasks, seconds=seconds)))
    dep.env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
    dep.start_task_services()
    if worker:
        dep.start_worker()
    return marks


def started_after(marks, since: float) -> list[float]:
    """The wall-clock times of the task starts after ``since``, in order."""
    path = marks / "starts"
    times = [float(line.split()[2]) for line in path.read_text().splitlines()] if path.exists() else []
    return sorted(t for t in times if t > since)


def runs_twice(marks) -> list[str]:
    """Task instances whose callable started more than once (the same dag, task, run, map index);
    a retry would be a second start too, and the busy DAGs have no retries."""
    path = marks / "starts"
    keys = [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []
    return sorted({key for key in keys if keys.count(key) > 1})


def starts(marks) -> int:
    path = marks / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def overlaps(marks) -> list[str]:
    path = marks / "overlaps"
    return path.read_text().splitlines() if path.exists() else []


def succeeded(postgres) -> int:
    return postgres.execute("SELECT count(*) FROM task_instance WHERE state = 'success'")[0][0]


def failed(postgres) -> int:
    return postgres.execute("SELECT count(*) FROM task_instance WHERE state = 'failed'")[0][0]


def queued(postgres) -> int:
    return postgres.execute("SELECT count(*) FROM task_instance WHERE state = 'queued'")[0][0]


def scheduler_up(dep, postgres, *args: str, stock: bool = False, **env: str):
    """Ours: until its health check answers. Stock: as shipped, with Airflow's health server off
    (its default), until its heartbeat is in the database. On 2.x that server's forked child
    shares the scheduler's DB socket and can read the reply to the scheduler's own query at its
    first request: stock then waits forever (seen twice in CI; ours no longer shares it, see
    ``compat.forget_inherited_db_connections``)."""
    if not stock:
        proc = dep.scheduler(*args, **env)
        proc.wait_healthy(180)
        return proc
    proc = dep.scheduler(*args, stock=True, AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="False", **env)
    wait_for(heartbeating(postgres, proc, "scheduler"), 180, interval=0.5, message="a stock scheduler heartbeat")
    return proc


def working(postgres, proc, at_least: int, timeout: float = 360) -> int:
    """Until ``at_least`` task instances have succeeded (through the worker) under ``proc``."""

    def enough() -> int | bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"exited early with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
        done = succeeded(postgres)
        return done if done >= at_least else False

    try:
        return wait_for(enough, timeout, interval=1, message=f"{at_least} task instances to succeed")
    except AssertionError as exc:
        states = postgres.execute("SELECT state, count(*) FROM task_instance GROUP BY state")
        dags = postgres.execute("SELECT count(*) FROM serialized_dag")[0][0]
        raise AssertionError(f"{exc}; task instances by state: {states}; serialized DAGs: {dags}\n"
                             f"scheduler:\n{proc.log()[-3000:]}\n"
                             f"worker:\n{_tail(proc.log_path.parent / 'celery.log')}\n"
                             f"DAG processor (2.x, in the scheduler):\n"
                             f"{_tail(proc.log_path.parent / 'logs' / 'dag_processor_manager' / 'dag_processor_manager.log')}"
                             ) from None


def _tail(path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path.name}: none)"


def heartbeat_age(postgres) -> float:
    return postgres.execute(
        "SELECT extract(epoch FROM now() - max(latest_heartbeat)) FROM job"
        " WHERE job_type = 'SchedulerJob' AND state = 'running'")[0][0]

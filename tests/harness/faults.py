"""Faults to inject and the checks that follow them, shared by the tests and the bench: plugins and
logging set-ups that misbehave, a DAG whose tasks run until stopped, starting a scheduler and
waiting until it is up, killing it, and checking from outside that it is gone and left nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
from pathlib import Path

import psutil

from harness.procs import wait_for

#: Margin for a loaded 2-core CI machine between "deadline" and "process observed gone".
MARGIN = 10.0

LEAKY_THREAD_PLUGIN = """
    import threading

    from airflow.listeners import hookimpl
    from airflow.plugins_manager import AirflowPlugin


    def _serve_forever():
        threading.Event().wait()


    class _Listener:
        @hookimpl
        def on_starting(self, component):
            # What a metrics exporter or client library does: a non-daemon worker thread.
            threading.Thread(target=_serve_forever, name="leaky-plugin-thread").start()


    class LeakyThreadPlugin(AirflowPlugin):
        name = "leaky_thread"
        listeners = [_Listener()]
"""

BLOCKING_ATEXIT_PLUGIN = """
    import atexit
    import threading

    from airflow.listeners import hookimpl
    from airflow.plugins_manager import AirflowPlugin


    def flush_forever_at_exit():
        threading.Event().wait()


    class _Listener:
        @hookimpl
        def on_starting(self, component):
            atexit.register(flush_forever_at_exit)


    class BlockingAtexitPlugin(AirflowPlugin):
        name = "blocking_atexit"
        listeners = [_Listener()]
"""

HANGING_SHUTDOWN_PLUGIN = """
    import threading

    from airflow.listeners import hookimpl
    from airflow.plugins_manager import AirflowPlugin


    class _Listener:
        @hookimpl
        def before_stopping(self, component):
            hang_in_before_stopping()


    def hang_in_before_stopping():
        threading.Event().wait()


    class HangingShutdownPlugin(AirflowPlugin):
        name = "hanging_shutdown"
        listeners = [_Listener()]
"""


# airflow_local_settings.py that makes the health-check server ignore SIGTERM. It patches the
# stdlib server the health check runs (importing Airflow modules here would be circular in 2.x).
DEAF_HEALTH_CHECK = """
    import http.server
    import signal

    _serve_forever = http.server.HTTPServer.serve_forever


    def deaf_serve_forever(self, *args, **kwargs):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _serve_forever(self, *args, **kwargs)


    http.server.HTTPServer.serve_forever = deaf_serve_forever
"""


# airflow_local_settings.py that makes both our servers deaf to SIGTERM: ignored in the child before
# the server starts, and every later attempt to handle it there (uvicorn, gunicorn) quietly dropped.
DEAF_SERVERS = """
    import multiprocessing.process
    import signal

    _run = multiprocessing.process.BaseProcess.run
    _signal = signal.signal


    def deaf_run(self):
        if self.name in ("serve-logs", "health-check"):
            _signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal = lambda signum, handler: None if signum == signal.SIGTERM else _signal(signum, handler)
        return _run(self)


    multiprocessing.process.BaseProcess.run = deaf_run
"""


def started_scheduler(deployment, *args, **env):
    """A safe scheduler that is up: heartbeating, with serve-logs, health check and workers."""
    scheduler = deployment.scheduler(*args, **env)
    scheduler.wait_healthy()
    workers = int(env.get("AIRFLOW__CORE__PARALLELISM", deployment.env["AIRFLOW__CORE__PARALLELISM"]))
    wait_for(lambda: len(scheduler.descendants_named("worker")) >= workers, 60,
             message=f"{workers} executor workers")
    # serve-logs imports its web app before it binds: on a loaded machine that takes a while.
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")
    return scheduler


def started_stock(deployment, **env):
    """A stock ``airflow scheduler`` that reports healthy, tried twice.

    Stock 2.x now and then fails at start-up, and that is not what the stock tests document. Its
    health-check child pings the scheduler's own pooled DB connection, inherited by fork, and the two
    read each other's replies (``test_servers.test_a_server_never_uses_the_job_process_db_connection``
    shows it; ours no longer does). Seen on CI with 2.11.2: the first INSERT into ``job`` failing
    with "error with status PGRES_TUPLES_OK and no message from the libpq", and a scheduler whose
    health child never answered 200 in 120 s. So a first start that does not become healthy is
    killed, with everything it forked, and started once more.
    """
    for attempt in (1, 2):
        scheduler = deployment.scheduler(stock=True, **env)
        try:
            scheduler.wait_healthy(timeout=90 if attempt == 1 else 120)
            return scheduler
        except AssertionError:
            if attempt == 2:
                raise
            scheduler.cleanup()


def assert_exits(scheduler, since: float, within: float) -> tuple[int, float]:
    code = scheduler.wait_exit(within)
    assert code is not None, f"still running {within:g}s after the fault:\n{scheduler.log()[-4000:]}"
    return code, scheduler.exited_at - since


def assert_no_orphans(scheduler, timeout: float = 5.0) -> None:
    left = scheduler.survivors_after(timeout)
    assert not left, f"processes outlived the scheduler: {[(p.pid, p.name()) for p in left]}"


#: What an operator's ``pkill -9 -f`` names: the console scripts, and ``python -m safe_scheduler``.
SAFE_COMMAND_NAMES = ("airflow-safe-", "-m safe_scheduler")


def kill(proc, target: str) -> None:
    """SIGKILL the top process (what supervisord tracks), the job process below it, or ``both``:
    every process whose command line names the safe command, at once, as ``pkill -9 -f`` does."""
    if target == "top":
        proc.signal(signal.SIGKILL)
        assert proc.wait_exit(10) == -signal.SIGKILL
    elif target == "job":
        os.kill(proc.job_pid, signal.SIGKILL)
        code = proc.wait_exit(30)
        assert code == 128 + signal.SIGKILL, f"exit {code}:\n{proc.log()[-3000:]}"
    else:
        named = [p for p in [psutil.Process(proc.pid), *proc.survivors()] if _names_the_command(p)]
        assert {proc.pid, proc.job_pid} <= {p.pid for p in named}, [" ".join(p.cmdline()) for p in named]
        for victim in named:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        assert proc.wait_exit(10) == -signal.SIGKILL


def _names_the_command(proc: psutil.Process) -> bool:
    try:
        command = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(name in command for name in SAFE_COMMAND_NAMES)


RUNNING_TASKS_DAG = """
    import os
    import time
    from datetime import datetime

    try:
        from airflow.sdk import DAG, BaseOperator
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.models import BaseOperator


    class Sleeper(BaseOperator):
        def execute(self, context):
            open(os.path.join({marks!r}, f"started-{{self.task_id}}"), "w").write(str(os.getpid()))
            with open(os.path.join({marks!r}, f"runs-{{self.task_id}}"), "a") as runs:  # one line a try
                runs.write(f"{{os.getpid()}} {{time.time()}}\\n")
            time.sleep({seconds})

        def on_kill(self):
            open(os.path.join({marks!r}, f"on_kill-{{self.task_id}}"), "w").write(str(os.getpid()))


    with DAG("long_tasks", schedule="@once", start_date=datetime(2026, 1, 1), catchup=False):
        Sleeper(task_id="a")
        Sleeper(task_id="b")
"""


def with_running_tasks(deployment, marks: Path, seconds: float = 600) -> None:
    """``RUNNING_TASKS_DAG``, unpaused, its two tasks running ``seconds`` each and marking into
    ``marks``; on Airflow 3 with the api-server and dag-processor that tasks need."""
    marks.mkdir()
    dag = RUNNING_TASKS_DAG.format(marks=str(marks), seconds=seconds)
    (deployment.home / "dags" / "long_tasks.py").write_text(textwrap.dedent(dag))
    deployment.env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
    deployment.start_task_services()


def task_states(postgres) -> set[tuple]:
    """(task, state, try number) of each of ``RUNNING_TASKS_DAG``'s task instances."""
    return set(postgres.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = 'long_tasks'"))


def tries_started(marks: Path) -> dict[str, int]:
    """How many tries of each task started (each writes a line when it starts)."""
    return {runs.name[len("runs-"):]: len(runs.read_text().splitlines()) for runs in marks.glob("runs-*")}


def running_tasks(scheduler, marks: Path) -> list[psutil.Process]:
    """Both tasks, once each has written its pid (the scheduler's log in the error if they never do)."""

    def task_pids() -> list[int]:
        pids = [mark.read_text() for mark in marks.glob("started-*")]  # a mark may exist still empty
        return [int(pid) for pid in pids] if len(pids) == 2 and all(pids) else []

    try:
        pids = wait_for(task_pids, 240, interval=0.5, message="both tasks to run")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; scheduler log:\n{scheduler.log()[-3000:]}") from None
    return [psutil.Process(pid) for pid in pids]

"""Task code that cancels its external job when stopped, run as Airflow runs it.

A small HTTP server on loopback stands in for the external service (a cloud job API): it records
every start and cancel. Tasks run under ``airflow tasks test`` in a real subprocess with a real
(SQLite) metadata database; the tests signal that process and read the outcome from the service
and from Airflow's own task_instance table.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.deployment import PYTHON, base_env
from harness.jobservice import JobService
from harness.procs import TreeWatcher, wait_for


DAG_FILE = """
    import json
    import os
    import time
    import urllib.request
    from datetime import datetime, timedelta

    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG

    from safe_scheduler.tasks import on_termination

    SERVICE = os.environ["JOB_SERVICE"]


    def call(method, path):
        data = b"" if method == "POST" else None
        request = urllib.request.Request(SERVICE + path, method=method, data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")


    def cancel(job_id):
        call("POST", f"/jobs/{job_id}/cancel")


    def hang_forever(job_id):
        call("POST", f"/jobs/{job_id}/hanging-cleanup")
        time.sleep(600)


    class RecordingOperator(PythonOperator):
        def on_kill(self):
            call("POST", f"/events/on_kill/{self.task_id}")   # proves Airflow's own handling ran
            super().on_kill()


    def run_job(mode):
        with on_termination(timeout=2) as stop:
            job = call("POST", "/jobs?slow=3" if mode == "slow-start" else "/jobs")["id"]
            if mode == "hanging-cleanup":
                stop.add(cancel, job)          # added first, runs last: after the hang is cut off
                stop.add(hang_forever, job)
            else:
                stop.add(cancel, job)
            if mode == "fail":
                raise RuntimeError("the task failed after starting its job")
            if mode == "succeed":
                return "done"
            while call("GET", f"/jobs/{job}")["state"] == "running":
                time.sleep(0.2)
            time.sleep(2)  # winding down, still inside the block: a second signal lands here
            raise RuntimeError(f"job {job} was cancelled")


    with DAG("external_jobs", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
        for mode in ("wait", "fail", "succeed", "hanging-cleanup", "slow-start"):
            RecordingOperator(task_id=mode.replace("-", "_"), python_callable=run_job, op_args=[mode])
        RecordingOperator(
            task_id="timeout", python_callable=run_job, op_args=["wait"],
            execution_timeout=timedelta(seconds=3),
        )
"""


@pytest.fixture(scope="session")
def sqlite_template(test_root: Path, worker_id: str) -> Path:
    """One migrated SQLite metadata database per worker, copied into each test's AIRFLOW_HOME."""
    home = test_root / f"sqlite-template-{worker_id}"
    home.mkdir()
    done = subprocess.run([PYTHON, "-m", "airflow", "db", "migrate"], env=base_env(home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return home / "airflow.db"


@pytest.fixture
def service():
    svc = JobService()
    yield svc
    svc.close()


class TaskRun:
    def __init__(self, home: Path, task_id: str, service: JobService) -> None:
        env = dict(base_env(home), JOB_SERVICE=service.url)
        self.home, self.task_id = home, task_id
        self.log = open(home / f"{task_id}.log", "wb")
        self.popen = subprocess.Popen(
            [PYTHON, "-m", "airflow", "tasks", "test", "external_jobs", task_id],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.tree = TreeWatcher(self.popen.pid)

    def output(self) -> str:
        return (self.home / f"{self.task_id}.log").read_text(errors="replace")

    def state(self) -> str | None:
        """The final state Airflow's execution API recorded (``tasks test`` deletes its temporary run
        afterwards, so the table is empty by now; the API's own log line is what remains)."""
        states = re.findall(r"Task instance state updated .*new_state=(\w+)", self.output())
        return states[-1] if states else None

    def finish(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"task still running after {timeout}s:\n{self.output()[-3000:]}") from None

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.tree.kill_survivors()
        self.log.close()


@pytest.fixture
def run_task(tmp_path: Path, sqlite_template: Path, service: JobService):
    runs: list[TaskRun] = []

    def start(task_id: str) -> TaskRun:
        home = tmp_path / "airflow"
        (home / "dags").mkdir(parents=True)
        (home / "dags" / "external_jobs.py").write_text(textwrap.dedent(DAG_FILE))
        shutil.copy(sqlite_template, home / "airflow.db")
        run = TaskRun(home, task_id, service)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def _started(run: TaskRun, service: JobService) -> None:
    wait_for(lambda: service.count("/jobs") >= 1 or run.popen.poll() is not None, 120,
             message="the task to start its external job")
    assert run.popen.poll() is None, run.output()[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_task_cancels_its_job_and_airflow_still_handles_it(run_task, service, sig):
    run = run_task("wait")
    _started(run, service)
    run.popen.send_signal(sig)
    run.finish(60)
    assert service.jobs == {1: "cancelled"}
    assert service.count("/jobs/1/cancel") == 1
    if sig == signal.SIGTERM:
        assert service.count("/events/on_kill/wait") == 1  # Airflow's handler ran after ours
    assert run.state() == "failed", run.output()[-3000:]
    assert not run.tree.survivors()


def test_double_sigterm_cancels_once(run_task, service):
    run = run_task("wait")
    _started(run, service)
    run.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: service.count("/events/on_kill/wait") == 1, 30, message="the first SIGTERM handled")
    run.popen.send_signal(signal.SIGTERM)
    run.finish(120)  # a loaded CI machine took more than 60 s once (the process is not ours: Airflow's task runner)
    assert service.count("/jobs/1/cancel") == 1
    assert service.count("/events/on_kill/wait") == 2  # Airflow's handler saw both signals
    assert run.state() == "failed"


def test_sigterm_while_the_job_starts_cancels_it_once_its_id_is_known(run_task, service):
    """Airflow 3's handler only calls on_kill, so the task goes on: the cancel added after the signal
    must run at once (this race, hit by chance, once left a CI run's task running forever)."""
    run = run_task("slow_start")
    wait_for(lambda: service.count("/jobs?slow") == 1 or run.popen.poll() is not None, 120,
             message="the task to ask for its external job")
    run.popen.send_signal(signal.SIGTERM)  # the service answers 3 s after the call came
    run.finish(60)
    assert service.count("/events/on_kill/slow_start") == 1  # the signal came inside the block
    assert service.jobs == {1: "cancelled"}
    assert service.count("/jobs/1/cancel") == 1
    assert run.state() == "failed", run.output()[-3000:]


def test_execution_timeout_cancels_the_job(run_task, service):
    run = run_task("timeout")
    run.finish(120)
    assert service.jobs == {1: "cancelled"}
    assert service.count("/jobs/1/cancel") == 1
    assert service.count("/events/on_kill/timeout") == 1
    assert run.state() == "failed", run.output()[-3000:]


def test_exception_in_task_cancels_the_job(run_task, service):
    run = run_task("fail")
    run.finish(120)
    assert service.jobs == {1: "cancelled"}
    assert run.state() == "failed"


def test_successful_task_never_cancels(run_task, service):
    run = run_task("succeed")
    run.finish(120)
    assert service.jobs == {1: "running"}
    assert service.count("/jobs/1/cancel") == 0
    assert run.state() == "success", run.output()[-3000:]


def test_hanging_cleanup_is_cut_off_and_the_rest_still_run(run_task, service):
    run = run_task("hanging_cleanup")
    _started(run, service)
    sent = time.monotonic()
    run.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: service.jobs.get(1) == "cancelled", 30, message="the cancel after the hung cleanup")
    assert time.monotonic() - sent >= 2  # the hung cleanup had its 2 s
    assert service.count("/jobs/1/hanging-cleanup") == 1
    run.finish(60)
    assert run.state() == "failed"


# -- the same mechanics without Airflow: nesting, order, restore ----------------------------------

UNIT_SCRIPT = """
    import os, signal, sys
    from safe_scheduler.tasks import on_termination

    order = []
    def airflow_handler(signum, frame):
        order.append("airflow")
    signal.signal(signal.SIGTERM, airflow_handler)

    with on_termination(order.append, "outer-1") as outer:
        outer.add(order.append, "outer-2")
        with on_termination(order.append, "inner"):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    with on_termination(order.append, "never"):
        pass
    assert signal.getsignal(signal.SIGTERM) is airflow_handler, "handler not restored"
    print(",".join(order))
"""


LATE_ADD_SCRIPT = """
    import os, signal
    from safe_scheduler.tasks import on_termination

    order = []
    signal.signal(signal.SIGTERM, lambda signum, frame: order.append("airflow"))

    with on_termination(order.append, "first") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        order.append("went on")
        stop.add(order.append, "late")
        os.kill(os.getpid(), signal.SIGTERM)
    print(",".join(order))
"""


def _run_script(script: str) -> str:
    """Run one of the scripts above in a fresh interpreter (its own signal handlers); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_cleanup_added_after_the_signal_runs_at_once_and_once():
    assert _run_script(LATE_ADD_SCRIPT) == "first,airflow,went on,late,airflow"


def test_nested_blocks_run_innermost_first_once_and_restore_the_handler():
    assert _run_script(UNIT_SCRIPT) == "inner,outer-2,outer-1,airflow,airflow"

"""Running tasks on the way out, under a real scheduler and a real DAG run.

A LocalExecutor task starts a job at a stand-in external service on loopback and waits for it,
with ``on_termination`` registered to cancel it: the ghost-job case. The scheduler is then stopped
(DB gone, SIGTERM), and the service tells from outside whether the job was cancelled. On Airflow 3
a real api-server and dag-processor run beside the scheduler.
"""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from harness.external_job import write_dag
from harness.jobservice import JobService
from harness.procs import wait_for

pytestmark = pytest.mark.all_versions

SHUTDOWN, CHILD_STOP = 10, 3
MARGIN = 10.0
#: Seconds a scheduler may take to notice that the database went away (its next query fails).
NOTICE = 5.0
#: Seconds a loaded machine may take between a SIGTERM sent and the job noticing it.
SIGNAL_NOTICE = 2.0
#: Seconds from a task's instant cleanup to its process's end, once the database is gone: 1 s, the
#: goal, and 1 s for a loaded 2-core CI machine. On Airflow 3 it was the whole cleanup budget (4 s
#: here, then a kill): the task waited while its supervisor retried its report to the api-server,
#: whose database was gone too (``task_reports``).
AFTER_CLEANUP = 2.0

@pytest.fixture
def service():
    svc = JobService()
    yield svc
    svc.close()


def _running_job(deployment, service, mode: str = "wait", flags: tuple = (), **env: str):
    """A safe scheduler whose one task has started its external job."""
    write_dag(deployment.home / "dags", service.url, mode)
    deployment.env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
    deployment.start_task_services()
    scheduler = deployment.scheduler(
        *(flags or ("--shutdown-timeout", str(SHUTDOWN), "--child-stop-timeout", str(CHILD_STOP))), **env
    )
    try:
        wait_for(lambda: len(service.jobs) >= 1, 240, interval=0.5, message="the task to start its job")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; scheduler log:\n{scheduler.log()[-3000:]}") from None
    return scheduler


def _gone(scheduler, since: float) -> tuple[int, float]:
    code = scheduler.wait_exit(NOTICE + SHUTDOWN + MARGIN)
    assert code is not None, f"still running {SHUTDOWN + MARGIN:g}s later:\n{scheduler.log()[-4000:]}"
    left = scheduler.survivors_after(5)
    assert not left, f"outlived the scheduler: {[(p.pid, ' '.join(p.cmdline())) for p in left]}"
    return code, scheduler.exited_at - since


def _ended_at(pid: int, timeout: float) -> list[float]:
    """Watch ``pid`` from a thread; the list gets the moment it is gone (empty while it lives)."""
    ended: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        else:
            return
        ended.append(time.monotonic())

    threading.Thread(target=watch, daemon=True).start()
    return ended


def test_db_stopped_cancels_the_job_and_the_retry_starts_one(deployment, postgres, service):
    scheduler = _running_job(deployment, service)
    task_ended = _ended_at(service.task_pids()[0], NOTICE + SHUTDOWN + MARGIN)
    postgres.stop("immediate")
    code, took = _gone(scheduler, time.monotonic())

    assert code == 1, scheduler.log()[-4000:]
    assert took < NOTICE + SHUTDOWN, f"took {took:.1f}s:\n{scheduler.log()[-6000:]}"
    assert service.jobs == {1: "cancelled"}, f"{service.calls}\n{scheduler.log()[-3000:]}"
    # At the task's pace: once its cleanup has run, its report does not hold it (the database is gone).
    assert task_ended, "the task process outlived its scheduler"
    after = task_ended[0] - service.when("/cancel")[0]
    assert after < AFTER_CLEANUP, f"the task ended {after:.1f}s after its cleanup:\n{scheduler.log()[-6000:]}"

    # The database comes back; the task instance that was running is found without a heartbeat and
    # retried: exactly one new job, none left from before.
    postgres.start()
    deployment.start_task_services()
    # The old scheduler's task instance is reset by the next one's check for orphaned tasks, every
    # 5 s instead of 300 s (the old scheduler's heartbeat is long older than the 30 s threshold).
    again = deployment.scheduler(AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="5")
    try:
        wait_for(lambda: len(service.jobs) >= 2 or again.popen.poll() is not None, 240, interval=0.5,
                 message="the retry to start its job")
    except AssertionError as exc:
        states = postgres.execute("SELECT task_id, state, try_number FROM task_instance")
        raise AssertionError(f"{exc}; task instances: {states}\n{again.log()[-5000:]}") from None
    assert again.popen.poll() is None, again.log()[-3000:]
    time.sleep(3)  # a grace period for a second, wrong start to show up; not the assertion itself
    assert service.jobs == {1: "cancelled", 2: "running"}, service.calls


def test_sigterm_cancels_the_job_and_exits_0(deployment, service):
    scheduler = _running_job(deployment, service)
    code, took = _gone(scheduler, scheduler.signal(signal.SIGTERM))

    assert code == 0, scheduler.log()[-4000:]
    assert took < SHUTDOWN, f"took {took:.1f}s:\n{scheduler.log()[-6000:]}"
    assert service.jobs == {1: "cancelled"}, f"{service.calls}\n{scheduler.log()[-3000:]}"


@pytest.mark.parametrize(
    ("flags", "drain", "cleanup"),
    [((), 0.0, 4.0), (("--shutdown-timeout", "12", "--child-stop-timeout", "2", "--task-drain-timeout", "2",
                       "--task-cleanup-timeout", "5"), 2.0, 5.0)],
    ids=["derived", "the-whole-room"],
)
def test_a_cleanup_gets_every_second_promised_then_is_cut(deployment, service, flags, drain, cleanup):
    """A cleanup that takes whatever it is given (it ticks until killed) gets the whole
    ``task_cleanup_timeout`` the settings promise, after the drain, and the stop still ends by plan
    (exit 0, not 3) within the deadline. ``derived``: 10 s less the servers' 3 s and 3 kills leave
    4 s, all cleanup. ``the-whole-room``: 12 - 2 - 3 = 7 s, 2 of drain and 5 of cleanup, to the
    second (``test_settings.py`` runs the whole grid through the same arithmetic).

    The deadline starts when the job *notices* the signal: once, on a loaded CI machine, that came
    1.7 s after the SIGTERM was sent (the GIL held)."""
    shutdown = float(flags[1]) if flags else SHUTDOWN
    scheduler = _running_job(deployment, service, mode="ticking-cleanup", flags=flags)
    sent = scheduler.signal(signal.SIGTERM)
    code, took = _gone(scheduler, sent)

    assert code == 0, scheduler.log()[-4000:]
    assert took < shutdown + SIGNAL_NOTICE, f"took {took:.1f}s:\n{scheduler.log()[-6000:]}"
    ticks = service.when("/tick")
    assert ticks, f"the cleanup never ran: {service.calls}"
    assert ticks[0] - sent >= drain - 0.5, f"SIGTERM {ticks[0] - sent:.1f}s after the signal, before the drain"
    given = ticks[-1] - ticks[0]
    # Ticks come every ~0.1 s (a request and a sleep): the last one lands up to ~0.3 s before the kill.
    assert cleanup - 0.6 <= given <= cleanup + 1.0, f"the cleanup got {given:.1f}s of the {cleanup:g}s promised"

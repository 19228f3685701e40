"""CeleryExecutor, the official chart's default: a real Redis broker, a real ``airflow celery
worker``, real PostgreSQL, and busy DAGs whose tasks record every start themselves.

Each task writes a start line, and before it does, checks whether another instance of the same
task instance (dag, task, run, map index) is still running: the pid of the last one to start is in
a file, and a live pid there is a second, simultaneous run. That side effect is counted, not
Airflow's own state.
"""

from __future__ import annotations

import signal
import time

import pytest

from harness.celery import busy, failed, heartbeat_age, overlaps, scheduler_up, starts, succeeded, working
from harness.faults import LEAKY_THREAD_PLUGIN, MARGIN, assert_exits, assert_no_orphans, kill
from harness.procs import wait_for

pytestmark = pytest.mark.celery

# -- tasks run ---------------------------------------------------------------------------------------


def test_tasks_run_end_to_end_once_each_and_sigterm_is_clean(celery_deployment, postgres):
    marks = busy(celery_deployment)
    proc = scheduler_up(celery_deployment, postgres)
    working(postgres, proc, 8)
    assert starts(marks) >= 8
    sent = proc.signal(signal.SIGTERM)
    code, _ = assert_exits(proc, sent, 30 + MARGIN)
    assert code == 0, proc.log()[-4000:]
    assert_no_orphans(proc)
    assert not overlaps(marks)


# -- the scheduler's faults, with tasks flowing ------------------------------------------------------


@pytest.mark.parametrize("fault", ["db-stop", "db-stop-with-thread", "db-frozen"])
def test_db_faults_end_the_scheduler_in_time(celery_deployment, postgres, fault):
    if fault == "db-stop-with-thread":
        celery_deployment.add_plugin("leaky_thread", LEAKY_THREAD_PLUGIN)
    marks = busy(celery_deployment)
    proc = scheduler_up(celery_deployment, postgres, "--shutdown-timeout", "15", "--stall-timeout", "10")
    working(postgres, proc, 4)

    if fault == "db-frozen":
        postgres.freeze()
    else:
        postgres.stop("immediate")
    began = time.monotonic()
    bound = 15 + (10 if fault == "db-frozen" else 0)
    code, took = assert_exits(proc, began, bound + MARGIN)
    if fault == "db-frozen":
        postgres.thaw()
    assert code == (4 if fault == "db-frozen" else 1), proc.log()[-4000:]
    assert took < bound + 2, f"took {took:.1f}s"
    assert_no_orphans(proc)
    assert not overlaps(marks)


@pytest.mark.parametrize("target", ["top", "job"])
def test_sigkill_while_sending_leaves_nothing(celery_deployment, postgres, target):
    """Tasks sent through a process pool (``[celery] sync_parallelism`` above 1; on two cores the
    default sends from the main thread), killed in the middle of sending."""
    celery_deployment.env["AIRFLOW__CELERY__SYNC_PARALLELISM"] = "4"
    marks = busy(celery_deployment, dags=4, tasks=4)
    proc = scheduler_up(celery_deployment, postgres, "--shutdown-timeout", "10")
    working(postgres, proc, 4)
    servers = {p.pid for p in proc.below_job()}  # Airflow's health check; no serve-logs under Celery
    # The pool's processes live for one batch of sends: the kill lands while one is there.
    wait_for(lambda: [p for p in proc.below_job() if p.pid not in servers], 120, interval=0.02,
             message="a send pool process")
    kill(proc, target)
    # Killing the top process ends in the job's own stop (its death signal), within the deadline:
    # a SIGTERM that lands in a fork's at-fork hooks is lost to Airflow's handler (README, Limits),
    # and then the deadline ends it.
    assert_no_orphans(proc, timeout=10 + MARGIN if target == "top" else 5.0)
    assert not overlaps(marks)


# -- broker faults -----------------------------------------------------------------------------------


def test_broker_frozen_never_hangs_the_scheduler(celery_deployment, postgres):
    """Redis SIGSTOPped: the scheduler either keeps heartbeating (what does not need the broker goes
    on) or is ended by its stall watchdog within stall_timeout + shutdown_timeout. Measured: it
    keeps heartbeating, each loop slowed by the sends that wait out ``[celery] operation_timeout``."""
    marks = busy(celery_deployment)
    proc = scheduler_up(celery_deployment, postgres, "--stall-timeout", "30", "--shutdown-timeout", "10")
    working(postgres, proc, 4)
    celery_deployment.redis.freeze()
    frozen = time.monotonic()
    ages = []
    while time.monotonic() - frozen < 30 + 10 + MARGIN and proc.popen.poll() is None:
        ages.append(float(heartbeat_age(postgres)))
        time.sleep(1)
    celery_deployment.redis.thaw()
    if proc.popen.poll() is None:  # it kept heartbeating the whole time
        assert max(ages) < 30, f"heartbeat ages while the broker was frozen: {ages}"
        working(postgres, proc, succeeded(postgres) + 1, timeout=120)  # and works once it is back
    else:
        assert proc.popen.returncode == 4, proc.log()[-4000:]
        assert_no_orphans(proc)
    assert not overlaps(marks)


@pytest.mark.parametrize("stock", [True, False], ids=["stock", "safe"])
def test_broker_stopped_then_back_runs_what_became_ready(celery_deployment, postgres, stock):
    """Stock Airflow fails every task instance it could not send during the outage; ours holds
    them, QUEUED, and sends them once the broker answers again."""
    marks = busy(celery_deployment)
    proc = scheduler_up(celery_deployment, postgres, stock=stock)
    working(postgres, proc, 4)
    redis = celery_deployment.redis
    redis.stop()
    time.sleep(20)  # the outage: the fault itself, not a wait for a condition
    before, queued = succeeded(postgres), postgres.execute(
        "SELECT count(*) FROM task_instance WHERE state IN ('queued', 'scheduled')")[0][0]
    redis.start()
    back = time.monotonic()
    wait_for(lambda: succeeded(postgres) > before, 180, interval=0.5, message="a task to succeed after the outage")
    assert time.monotonic() - back < 60
    assert proc.popen.poll() is None, proc.log()[-4000:]
    if stock:
        assert failed(postgres) > 0  # what Airflow does: the sends failed, and so did the tasks
    else:
        assert failed(postgres) == 0
        assert queued > 0  # tasks became ready during the outage, and waited for the broker
        working(postgres, proc, before + queued, timeout=180)
    assert not overlaps(marks)

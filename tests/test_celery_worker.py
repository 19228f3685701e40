"""``airflow-safe-celery-worker`` against stock ``airflow celery worker``: a real Redis, a real
scheduler sending busy DAGs' tasks, real PostgreSQL (and from Airflow 3 a real api-server and
dag-processor). Each task records its own start (``harness.celery``): a task instance whose callable
started twice, or two at once, is counted from that side effect, not from Airflow's state.

Stock's side of each fault runs on the newest release only (the issue measured both): it documents
the problem, and the time it takes is better spent on ours.
"""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import pytest

from harness.celery import busy, failed, overlaps, runs_twice, scheduler_up, started_after, succeeded, working
from harness.cli import OUR_FLAGS, flags_of, refused, run
from harness.components import LEAKY_LOGGING
from harness.deployment import PYTHON, base_env
from harness.external_job import write_dag
from harness.faults import MARGIN, assert_exits, assert_no_orphans, kill
from harness.jobservice import JobService
from harness.procs import wait_for
from harness.silence import SilenceableRelay
from safe_scheduler.base import compat

pytestmark = pytest.mark.celery

SAFE_WORKER = [str(Path(PYTHON).parent / "airflow-safe-celery-worker")]
SIDES = [True, False] if compat.AIRFLOW_3 else [False]
IDS = ["stock", "safe"] if compat.AIRFLOW_3 else ["safe"]
#: Short enough for a test; what the worker's own defaults would take is 590 s.
QUICK = ("--shutdown-timeout", "30", "--task-drain-timeout", "5", "--stall-timeout", "20")
#: The default drain would be what 30 s leave after the cleanup (nothing): set, so that tasks drain.


def _started(dep, postgres, *args: str, stock: bool = False, **env: str):
    """Busy DAGs, the worker, a safe scheduler sending to it; returns (worker, marks) once tasks run."""
    marks = busy(dep, dags=4, tasks=4, seconds=1, worker=False)
    worker = dep.worker(*(() if stock else QUICK + args), stock=stock, **env)
    scheduler_up(dep, postgres)
    working(postgres, worker, 8)
    return worker, marks


@pytest.mark.parametrize("stock", SIDES, ids=IDS)
def test_silent_broker_connections(celery_deployment, postgres, stock):
    """Every broker connection the worker holds goes silent; Redis stays up and new connections
    work. Stock stays alive and runs nothing more, with nothing logged; ours consumes again within
    ``stall_timeout`` + 10 s, and no task instance runs twice."""
    dep = celery_deployment
    relay = SilenceableRelay(dep.redis.port)  # the worker's only: the scheduler keeps sending
    try:
        worker, marks = _started(dep, postgres, stock=stock, AIRFLOW__CELERY__BROKER_URL=relay.url())
        relay.silence()
        silenced = time.time()  # the tasks' own start marks are wall-clock times
        # Up to --concurrency tasks were received before the silence and start after it: consumption
        # is back once one more than those has started.
        if stock:
            assert worker.wait_exit(15) is None, worker.log()[-3000:]
            in_flight = len(started_after(marks, silenced))
            assert worker.wait_exit(30) is None, worker.log()[-3000:]
            assert len(started_after(marks, silenced)) == in_flight <= 4, "stock consumed again after the silence"
            return
        starts = wait_for(lambda: started_after(marks, silenced)[4:], 20 + 10 + MARGIN, interval=0.25,
                          message="a task received after the silence to start")
        assert starts[0] - silenced < 20 + 10, f"consumption resumed {starts[0] - silenced:.1f}s after the silence"
        working(postgres, worker, succeeded(postgres) + 8)  # and it goes on
        assert worker.popen.poll() is None  # through a reconnect, in the same process
        assert not runs_twice(marks) and not overlaps(marks), (runs_twice(marks), overlaps(marks))
    finally:
        relay.close()


@pytest.mark.parametrize("stock", SIDES, ids=IDS)
def test_sigterm_with_a_log_shipper_thread(celery_deployment, postgres, stock):
    """A logging config whose handler keeps a non-daemon thread (as remote-log shippers do). Stock
    never exits; ours lets the running tasks finish (the drain), exits 0 within the deadline and
    leaves nothing."""
    dep = celery_deployment
    (dep.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
    worker, marks = _started(dep, postgres, stock=stock,
                             AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS="leaky_logging.LOGGING_CONFIG")
    sent = worker.signal(signal.SIGTERM)
    if stock:
        assert worker.wait_exit(30) is None, "stock exited: the scenario no longer reproduces"
        return
    code, took = assert_exits(worker, sent, 30 + MARGIN)
    assert code == 0, worker.log()[-4000:]
    assert took < 30, f"took {took:.1f}s"
    assert_no_orphans(worker)
    assert failed(postgres) == 0  # drained: what ran at SIGTERM finished, nothing was killed
    assert not runs_twice(marks) and not overlaps(marks)


@pytest.mark.parametrize("target", ["top", "job"])
def test_a_killed_log_server_comes_back_and_kill_9_leaves_nothing(celery_deployment, postgres, target):
    """The worker's log server killed: it listens again within 10 s. Then ``kill -9`` of the PID that
    was started (the tiny parent: the job stops itself, within its deadline) or of the worker's
    main process (the parent sweeps at once): no process is left, and the external job of a task
    that was running (cancelled in its ``on_termination``) is cancelled: with
    ``orphaned_task_timeout`` 0 the tasks are stopped at once (by default they would finish their
    try first, ``test_work.py``)."""
    dep = celery_deployment
    service = JobService()
    try:
        write_dag(dep.home / "dags", service.url)
        worker, marks = _started(dep, postgres, "--orphaned-task-timeout", "0")
        wait_for(lambda: len(service.jobs) >= 1, 240, interval=0.5, message="the task to start its external job")
        _kill_the_log_server_then_the_worker(dep, worker, target)
        assert set(service.jobs.values()) == {"cancelled"}, f"{service.calls}\n{worker.log()[-3000:]}"
        assert not overlaps(marks)
    finally:
        service.close()


def _kill_the_log_server_then_the_worker(dep, worker, target: str) -> None:
    first = wait_for(lambda: worker.listening_on(dep.log_port), 60, message="serve-logs to listen")
    first[0].kill()
    wait_for(lambda: [p for p in worker.listening_on(dep.log_port) if p.pid != first[0].pid], 10 + MARGIN,
             message="serve-logs to listen again")
    kill(worker, target)
    assert_no_orphans(worker, timeout=30 + MARGIN if target == "top" else 5.0 + MARGIN)


def _celery_env(home) -> dict:
    """2.x lists ``airflow celery`` only under CeleryExecutor, which it refuses on SQLite; ``--help``
    and bad flags never connect, so the URL needs no server behind it."""
    return dict(base_env(home), AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
                AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="postgresql+psycopg2://nobody@127.0.0.1:1/none")


def test_flags_match_installed_airflow_celery_worker(home):
    env = _celery_env(home)
    stock = run([PYTHON, "-m", "airflow", "celery", "worker", "--help"], env)
    ours = run(SAFE_WORKER + ["--help"], env)
    assert stock.returncode == 0 and ours.returncode == 0, stock.stderr + ours.stderr
    stock_flags, our_flags = flags_of(stock.stdout), flags_of(ours.stdout)
    assert {"--concurrency", "--queues", "--daemon", "--skip-serve-logs"} <= stock_flags  # the parse is sound
    assert stock_flags <= our_flags, f"missing: {stock_flags - our_flags}"
    assert our_flags - stock_flags == OUR_FLAGS


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--concurrency", "many"], "invalid int value"),
        (["--shutdown-timeout", "20", "--task-drain-timeout", "30"], "must not exceed what shutdown_timeout (20s) leaves the tasks: 12s"),
        (["--stall-timeout", "soon"], "--stall-timeout must be a number"),
    ],
    ids=["bad-concurrency", "drain-longer-than-the-deadline", "bad-stall"],
)
def test_bad_input_is_one_line_and_exit_2(home, args, expect):
    assert expect in refused(run(SAFE_WORKER + args, _celery_env(home)), "airflow-safe-celery-worker")


def test_a_full_pool_is_no_stall_and_sigquit_during_the_drain_stops_now(celery_deployment, postgres):
    """Two long tasks fill a pool of two, so the consumer asks the broker for nothing, on purpose: for
    more than twice ``stall_timeout`` the worker neither reconnects (its relay to Redis accepts no new
    connection) nor stops. Then Celery's cold shutdown: SIGTERM starts a long drain; SIGQUIT ends it
    at once, and the running tasks get SIGTERM and their cleanup time (10 s here; a sleeping
    PythonOperator has no ``on_kill`` that ends it, so it is killed after that) instead of being
    waited for."""
    dep = celery_deployment
    relay = SilenceableRelay(dep.redis.port)
    try:
        marks = busy(dep, dags=2, tasks=2, seconds=120, worker=False)
        worker = dep.worker("--shutdown-timeout", "200", "--task-drain-timeout", "150", "--task-cleanup-timeout", "10",
                            "--stall-timeout", "8", concurrency=2, AIRFLOW__CELERY__BROKER_URL=relay.url())
        scheduler_up(dep, postgres)
        wait_for(lambda: len((marks / "starts").read_text().splitlines()) >= 2 if (marks / "starts").exists() else False,
                 180, interval=0.5, message="tasks to start")
        accepted = relay.accepted
        assert worker.wait_exit(2 * 8 + 2) is None, worker.log()[-3000:]
        assert relay.accepted == accepted, f"the worker reconnected with a full pool:\n{worker.log()[-3000:]}"
        sent = worker.signal(signal.SIGTERM)
        assert worker.wait_exit(5) is None  # draining: the tasks have two minutes to go
        worker.signal(signal.SIGQUIT)
        code, took = assert_exits(worker, sent, 200 + MARGIN)
        assert code == 0, worker.log()[-4000:]
        assert took < 5 + 10 + 15, f"took {took:.1f}s: the drain (150 s) was not cut short"
        assert_no_orphans(worker)
    finally:
        relay.close()

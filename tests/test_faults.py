"""Fault scenarios against a real scheduler and a real PostgreSQL server.

Each test starts ``airflow-safe-scheduler`` with its serve-logs and health-check children and the
executor's workers, waits until the health check reports a heartbeat, injects a fault, and then
checks from the outside: exit code, time from fault to exit, and that no process it forked is
still alive.
"""

from __future__ import annotations

import signal
import time
import pytest

from harness.faults import (
    BLOCKING_ATEXIT_PLUGIN, DEAF_HEALTH_CHECK, DEAF_SERVERS, HANGING_SHUTDOWN_PLUGIN, LEAKY_THREAD_PLUGIN, MARGIN,
    assert_exits, assert_no_orphans, kill, running_tasks, started_scheduler, started_stock, with_running_tasks,
)
from harness.procs import alive, threads_of, wait_for
from safe_scheduler import doctor

pytestmark = pytest.mark.all_versions

def test_db_stopped_exits_nonzero_without_orphans(deployment, postgres):
    """The seed scenario of Airflow #32706: the metadata DB goes away under a running scheduler."""
    scheduler = started_scheduler(deployment, "--shutdown-timeout", "20")
    children_before = len(scheduler.survivors())
    assert children_before >= 6  # serve-logs, health check, 4 workers

    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(scheduler, fault, 20 + MARGIN)

    assert code == 1, scheduler.log()[-4000:]
    assert took < 20, f"exit took {took:.1f}s; the deadline is 20s"
    assert_no_orphans(scheduler)


def test_db_stopped_with_leaked_non_daemon_thread(deployment, postgres):
    """A plugin's non-daemon thread holds stock Airflow forever; we exit in seconds and name it."""
    deployment.add_plugin("leaky_thread", LEAKY_THREAD_PLUGIN)
    scheduler = started_scheduler(deployment, "--shutdown-timeout", "60")

    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(scheduler, fault, 60 + MARGIN)

    assert code == 1, scheduler.log()[-4000:]
    # Not the 60s deadline: the cause is known once the run is over, so we do not wait for it.
    assert took < 30, f"took {took:.1f}s"
    assert "leaky-plugin-thread" in scheduler.log()
    assert_no_orphans(scheduler)


@pytest.mark.parametrize(
    ("plugin", "blocker"),
    [
        (BLOCKING_ATEXIT_PLUGIN, "flush_forever_at_exit"),
        (HANGING_SHUTDOWN_PLUGIN, "hang_in_before_stopping"),
    ],
    ids=["blocking-atexit", "hang-in-shutdown"],
)
def test_db_stopped_with_blocked_shutdown_is_forced(deployment, postgres, plugin, blocker):
    deployment.add_plugin("blocker", plugin)
    scheduler = started_scheduler(deployment, "--shutdown-timeout", "8", "--child-stop-timeout", "2")

    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(scheduler, fault, 8 + MARGIN + 10)

    assert code == 3, scheduler.log()[-4000:]
    assert took < 8 + MARGIN, f"took {took:.1f}s"
    log = scheduler.log()
    # The stack dump shows where it hung: the blocking function, named by this test.
    assert "Thread stacks at forced exit" in log and blocker in log.split("Thread stacks at forced exit", 1)[1], \
        log[-6000:]
    assert_no_orphans(scheduler)


def test_sigterm_is_a_clean_exit(deployment):
    scheduler = started_scheduler(deployment)
    sent = scheduler.signal(signal.SIGTERM)
    code, took = assert_exits(scheduler, sent, 30 + MARGIN)
    assert code == 0, scheduler.log()[-4000:]
    assert_no_orphans(scheduler)


def test_our_threads_are_named_in_the_kernel(deployment):
    """``top -H`` and ``bench/run.py`` tell our watchdogs apart from Airflow's threads by name."""
    scheduler = started_scheduler(deployment)
    wait_for(lambda: {"safe-signals", "safe-stall-wd"} <= {n for n, _ in threads_of(scheduler.job_pid).values()},
             30, message="threads named safe-signals and safe-stall-wd")
    scheduler.signal(signal.SIGTERM)
    assert scheduler.wait_exit(30 + MARGIN) == 0, scheduler.log()[-4000:]


def test_sigterm_while_shutdown_blocked_is_forced(deployment):
    deployment.add_plugin("blocker", HANGING_SHUTDOWN_PLUGIN)
    scheduler = started_scheduler(deployment, "--shutdown-timeout", "6", "--child-stop-timeout", "2")
    sent = scheduler.signal(signal.SIGTERM)
    code, took = assert_exits(scheduler, sent, 6 + MARGIN + 10)
    assert code == 3, scheduler.log()[-4000:]
    assert 6 <= took < 6 + MARGIN, f"took {took:.1f}s"
    assert "hang_in_before_stopping" in scheduler.log()
    assert_no_orphans(scheduler)


@pytest.mark.parametrize("target", ["top", "job"])
def test_sigkill_takes_every_descendant_with_it(deployment, target):
    """``kill -9`` of the PID the user started (our parent: the job process gets SIGTERM and stops
    its tree, within its deadline), or of the job process, the OOM killer's pick (its forks get
    their death signal from the kernel, and the parent stops whatever else is left)."""
    scheduler = started_scheduler(deployment, AIRFLOW__CORE__PARALLELISM="32")
    assert len(scheduler.survivors()) >= 34
    kill(scheduler, target)
    assert_no_orphans(scheduler, timeout=30 + MARGIN)


def test_sigkill_while_tasks_run_leaves_nothing_behind(deployment, tmp_path):
    """Tasks get SIGTERM (their ``on_kill`` runs), then nothing of the scheduler's outlives it.

    The death signal alone is not enough: Airflow 3's worker forwards it to the task it supervises,
    and the task runner answers with ``on_kill`` and carries on. The lifeline ends both.
    """
    marks = tmp_path / "marks"
    with_running_tasks(deployment, marks)
    scheduler = deployment.scheduler("--child-stop-timeout", "3")
    scheduler.wait_healthy()
    tasks = running_tasks(scheduler, marks)

    scheduler.signal(signal.SIGKILL)
    assert scheduler.wait_exit(10) == -signal.SIGKILL
    # Bounded by our lifeline (``--child-stop-timeout 3``) on Airflow 3; on Airflow 2 the worker dies
    # at once and the task's own graceful chain, bounded by Airflow's ``killed_task_cleanup_time``
    # (60 s), ends the rest. Either way a task sleeping for 600 s must not be left.
    left = scheduler.survivors_after(60 + MARGIN)
    assert not left, f"outlived the scheduler: {[(p.pid, ' '.join(p.cmdline())) for p in left]}"
    assert not any(alive(task) for task in tasks)
    assert sorted(m.name for m in marks.glob("on_kill-*")) == ["on_kill-a", "on_kill-b"]


def test_child_ignoring_sigterm_is_killed_after_child_stop_timeout(deployment):
    """The health-check server is made deaf to SIGTERM; the scheduler still stops in time."""
    deployment.add_local_settings(DEAF_HEALTH_CHECK)
    scheduler = started_scheduler(deployment, "--shutdown-timeout", "30", "--child-stop-timeout", "3")
    assert scheduler.listening_on(deployment.health_port)

    sent = scheduler.signal(signal.SIGTERM)
    code, took = assert_exits(scheduler, sent, 30 + MARGIN)

    # The cause decides: a SIGTERM stop is 0 even when Airflow's handler interrupts a query and the
    # next pool pre-ping fails on the way out ("set_session cannot be used inside a transaction").
    assert code == 0, scheduler.log()[-4000:]
    assert 3 <= took < 30, f"took {took:.1f}s: neither killed after 3s nor left to the 30s deadline"
    assert_no_orphans(scheduler)


def test_two_children_ignoring_sigterm_cost_one_child_stop_timeout(deployment):
    """Both servers are deaf: stopped together, they cost one child_stop_timeout, not one each, so a
    stop at half of shutdown_timeout still ends cleanly (exit 0), not as a forced exit (3)."""
    deployment.add_local_settings(DEAF_SERVERS)
    scheduler = started_scheduler(deployment, "--shutdown-timeout", "8", "--child-stop-timeout", "4")

    sent = scheduler.signal(signal.SIGTERM)
    code, took = assert_exits(scheduler, sent, 8 + MARGIN)

    assert code == 0, scheduler.log()[-4000:]
    assert 4 <= took < 8, f"took {took:.1f}s: not one child_stop_timeout (4s) within the 8s deadline:\n{scheduler.log()[-3000:]}"
    assert_no_orphans(scheduler)


@pytest.mark.parametrize(
    ("serve_logs", "health_check"),
    [(True, False), (False, True), (False, False)],  # both on: test_db_stopped_exits_nonzero_without_orphans
    ids=["serve-logs-only", "health-check-only", "neither"],
)
def test_optional_children_on_airflow_defaults(deployment, postgres, serve_logs, health_check):
    """Each optional child on or off, with no key set for it that a user would not set."""
    if not health_check:
        for key in ("AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK", "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"):
            del deployment.env[key]
    scheduler = deployment.scheduler("--shutdown-timeout", "20", *([] if serve_logs else ["--skip-serve-logs"]))

    def heartbeating() -> bool:
        if scheduler.popen.poll() is not None:
            raise AssertionError(f"exited early with {scheduler.popen.returncode}:\n{scheduler.log()[-4000:]}")
        return postgres.execute(
            "SELECT count(*) FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'"
            " AND latest_heartbeat > start_date"
        )[0][0] > 0

    wait_for(heartbeating, 120, interval=0.5, message="a scheduler heartbeat in the database")
    if health_check:
        scheduler.wait_healthy()
    if serve_logs:
        wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")
    else:
        assert not scheduler.listening_on(deployment.log_port)

    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(scheduler, fault, 20 + MARGIN)
    assert code == 1, scheduler.log()[-4000:]
    assert took < 20
    assert_no_orphans(scheduler)


# -- The same faults under stock `airflow scheduler`: the tests above can tell the difference. ------


def test_stock_scheduler_seed_scenario(deployment, postgres):
    """Documents stock ``airflow scheduler`` under the seed scenario on the installed release.

    Where the #32706 zombie path is present (2.6.3), the scheduler is dead but its process is still
    alive a minute later, serve-logs with it; where upstream fixed that path, it exits non-zero.
    """
    zombie_path = doctor.scheduler_leaks_children_on_error()
    scheduler = started_stock(deployment)
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 30, message="the serve-logs child")

    postgres.stop("immediate")
    code = scheduler.wait_exit(60)
    if zombie_path:
        assert code is None, f"stock Airflow exited ({code}): #32706 no longer reproduces"
        assert "Exception when executing SchedulerJob._run_scheduler_loop" in scheduler.log()
        assert scheduler.survivors(), "its serve-logs child is what it waits for"
    else:
        assert code not in (None, 0), scheduler.log()[-3000:]


def test_stock_scheduler_sigkill_leaves_orphans(deployment):
    """Documents the problem: SIGKILL of stock ``airflow scheduler`` leaves every child running."""
    scheduler = started_stock(deployment)
    wait_for(lambda: len(scheduler.descendants_named("worker")) >= 4, 30, message="executor workers")

    scheduler.signal(signal.SIGKILL)
    assert scheduler.wait_exit(10) == -signal.SIGKILL
    time.sleep(3)  # a grace period for the kernel, not an assertion: orphans are counted after it
    assert len(scheduler.survivors()) >= 6  # serve-logs, health check, 4 workers: all orphaned


@pytest.mark.stock
def test_stock_scheduler_with_leaked_thread_never_exits(deployment, postgres):
    """Documents the problem: a plugin's non-daemon thread keeps a failed stock scheduler alive."""
    deployment.add_plugin("leaky_thread", LEAKY_THREAD_PLUGIN)
    scheduler = started_stock(deployment)

    postgres.stop("immediate")
    assert scheduler.wait_exit(30) is None, "stock Airflow exited: the zombie scenario no longer reproduces"
    assert "Exception when executing SchedulerJob._run_scheduler_loop" in scheduler.log()


def test_daemon_mode_keeps_the_guarantees(deployment, postgres):
    """``-D``: the watchdog and fork hook start after daemonising, in the process that stays."""
    home = deployment.home
    launcher = deployment.scheduler(
        "-D", "--pid", str(home / "scheduler.pid"), "--log-file", str(home / "daemon.log"),
        "--stdout", str(home / "daemon.out"), "--stderr", str(home / "daemon.err"),
        "--shutdown-timeout", "20",
    )
    assert launcher.wait_exit(60) == 0, launcher.log()[-3000:]
    daemon_pid = wait_for(
        lambda: (home / "scheduler.pid").exists() and (home / "scheduler.pid").read_text().strip(),
        60, message="the daemon's pid file",
    )
    daemon = launcher.follow(int(daemon_pid))
    launcher.wait_healthy(daemon=daemon)
    wait_for(lambda: len(daemon.survivors()) >= 6, 30, message="the daemon's children")

    postgres.stop("immediate")
    fault = time.monotonic()
    wait_for(lambda: not alive(daemon.root), 20 + MARGIN, message="the daemon to exit")
    assert time.monotonic() - fault < 20 + MARGIN
    assert not daemon.survivors()
    assert "Scheduler failed" in (home / "daemon.log").read_text() + (home / "daemon.err").read_text()

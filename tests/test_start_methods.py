"""Every start method (``[core] mp_start_method``: fork, forkserver, spawn) on Airflow 3.3 (fork and
spawn on 2.x, the kills only), with real tasks running: nothing is left after ``kill -9`` of the PID
the user started, of the job process, or of both at once (``pkill -9 -f``), a DB stop ends in time,
SIGTERM stops cleanly, a killed log server listens again. The triggerer and the dag-processor: the
same kills under every method (their fork rows for the first two are ``test_components``' own).

Under ``forkserver`` (Python 3.14's default) and ``spawn`` the executor workers are not forked by
the job process: our code reaches them through multiprocessing's exec (``forkhook.arm``), and the
parent above the job (``reaper``) stops whatever else outlived the job.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

from harness.components import COMPONENTS, started_component, wait_parsing, with_parsing_process
from harness.faults import MARGIN, assert_exits, assert_no_orphans, kill, running_tasks, with_running_tasks
from harness.procs import alive, port_free, wait_for
from safe_scheduler.base import compat

# 2.x reads ``[core] mp_start_method`` only for the scheduler's DAG-file processor (its manager and
# parsing processes); the executor's workers always fork there. 3.3 applies it to everything.
METHODS = ["fork", "forkserver", "spawn"] if compat.AIRFLOW_3 else ["fork", "spawn"]
# Under fork, the DB stop and the killed log server are test_faults' and test_servers' own tests.
NOT_FORK = [method for method in METHODS if method != "fork"]
#: ``child_stop_timeout`` for the kills: what a process whose job is gone gives its own stop.
CHILD_STOP = 3.0
#: These tests are about processes: the tasks are stopped at once when the job goes, with
#: ``CHILD_STOP`` for their cleanup (``test_work.py`` lets them finish, the default).
AT_ONCE = ("--orphaned-task-timeout", "0", "--task-cleanup-timeout", str(CHILD_STOP))
#: What a loaded 2-core machine may add to "gone within child_stop_timeout + 2 s" (polling, reaping).
LOAD_SLACK = 3.0


def _with_method(deployment, method: str) -> None:
    deployment.env["AIRFLOW__CORE__MP_START_METHOD"] = method


def started_without_workers(deployment, *args: str):
    """Heartbeating, with serve-logs listening (under spawn and forkserver LocalExecutor starts
    its workers only once there is work, so they are not waited for here)."""
    scheduler = deployment.scheduler(*args)
    scheduler.wait_healthy()
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")
    return scheduler


def scheduler_with_tasks(deployment, tmp_path, method: str, own_session: bool = False):
    """A scheduler under ``method`` whose two tasks run; returns it and the tasks' processes."""
    _with_method(deployment, method)
    marks = tmp_path / "marks"
    with_running_tasks(deployment, marks)
    scheduler = deployment.scheduler("--child-stop-timeout", str(CHILD_STOP), *AT_ONCE, own_session=own_session)
    scheduler.wait_healthy()
    return scheduler, running_tasks(scheduler, marks)


def component_up(deployment, postgres, name: str, method: str, own_session: bool = False):
    """The triggerer, or the dag-processor with a parsing process that never ends, under ``method``."""
    _with_method(deployment, method)
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = started_component(deployment, postgres, name, "--child-stop-timeout", str(CHILD_STOP),
                             own_session=own_session)
    if name == "dag-processor":
        wait_parsing(proc)
    return proc


@pytest.mark.all_versions
@pytest.mark.parametrize("target", ["top", "job"])
@pytest.mark.parametrize("method", METHODS)
def test_sigkill_with_tasks_running_leaves_nothing(deployment, tmp_path, method, target):
    scheduler, tasks = scheduler_with_tasks(deployment, tmp_path, method)
    assert len(scheduler.below_job()) >= 6  # serve-logs, workers, tasks (and the forkserver, tracker)

    kill(scheduler, target)
    # Found by pid: everything the scheduler's tree ever held, tasks included.
    left = scheduler.survivors_after(30 + MARGIN)
    assert not left, f"outlived the scheduler: {[(p.pid, ' '.join(p.cmdline())[:120]) for p in left]}"
    assert not any(alive(task) for task in tasks)


@pytest.mark.all_versions
@pytest.mark.parametrize("target", ["top", "job"])
@pytest.mark.parametrize("method", NOT_FORK)
@pytest.mark.parametrize("name", COMPONENTS)
def test_component_sigkill_leaves_nothing(deployment, postgres, name, method, target):
    """The triggerer with its serve-logs (started through the forkserver, or spawned) and, on 3.x,
    its trigger runner; the dag-processor with a parsing process that never ends."""
    proc = component_up(deployment, postgres, name, method)
    seen = len(proc.below_job())
    assert seen
    kill(proc, target)
    left = proc.survivors_after(30 + MARGIN)
    assert not left, f"{len(left)} of {seen + 1} outlived the {name}: " \
        f"{[(p.pid, ' '.join(p.cmdline())[:120]) for p in left]}"


def _gone_by_pid_and_by_session(proc, within: float) -> float:
    """Seconds until nothing of ``proc`` is left, found by pid (everything its tree ever held) and by
    session (what re-parenting hid from the pids); fails past ``within``."""
    killed = time.monotonic()

    def left() -> list:
        return proc.survivors() + [p for p in proc.in_session() if p.pid not in {s.pid for s in proc.survivors()}]

    deadline = killed + within
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    rest = left()
    assert not rest, f"{len(rest)} left {within:g}s after the kill: " \
        f"{[(p.pid, ' '.join(p.cmdline())[:120]) for p in rest]}\n{proc.log()[-3000:]}"
    return time.monotonic() - killed


@pytest.mark.parametrize("method", METHODS)
def test_killing_parent_and_job_together_leaves_nothing(deployment, tmp_path, method):
    """``pkill -9 -f`` with tasks running: the parent and the job die at once, and nobody is left
    to sweep. Every process below them follows by its death signal and lifeline, the log port is
    free again, and the next scheduler starts (Airflow #40726's outage, from an admin command)."""
    scheduler, _ = scheduler_with_tasks(deployment, tmp_path, method, own_session=True)
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")

    kill(scheduler, "both")
    # The tasks' cleanup, their kill, and their workers' report of it.
    took = _gone_by_pid_and_by_session(scheduler, 2 * CHILD_STOP + 2 + LOAD_SLACK)
    print(f"{method}: all gone {took:.1f}s after the kill")
    assert port_free(deployment.log_port) and port_free(deployment.endpoint_port("scheduler"))
    again = started_without_workers(deployment)
    again.signal(signal.SIGTERM)
    assert again.wait_exit(30 + MARGIN) == 0, again.log()[-3000:]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", COMPONENTS)
def test_component_killed_with_its_parent_leaves_nothing(deployment, postgres, name, method):
    """The same ``pkill -9 -f`` for the triggerer (serve-logs, 3.x's trigger runner) and the
    dag-processor (a parsing process that never ends)."""
    proc = component_up(deployment, postgres, name, method, own_session=True)
    kill(proc, "both")
    took = _gone_by_pid_and_by_session(proc, CHILD_STOP + 2 + LOAD_SLACK)
    print(f"{name} {method}: all gone {took:.1f}s after the kill")


@pytest.mark.parametrize("method", NOT_FORK)
def test_db_stop_ends_in_time(deployment, postgres, method):
    _with_method(deployment, method)
    scheduler = started_without_workers(deployment, "--shutdown-timeout", "20")
    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(scheduler, fault, 20 + MARGIN)
    assert code == 1, scheduler.log()[-4000:]
    assert took < 20, f"took {took:.1f}s"
    assert_no_orphans(scheduler)


#: A grace long enough that waiting it out cannot pass for a prompt exit.
LONG_GRACE = 60


@pytest.mark.parametrize("method", NOT_FORK)
def test_killed_log_server_comes_back_and_sigterm_is_clean(deployment, method):
    """And SIGTERM does not wait out ``child_stop_timeout``: multiprocessing's resource tracker
    (started under these methods) ignores SIGTERM and ends only when its pipe closes. Nor does the
    exit print a traceback (our semaphores, unlinked twice)."""
    _with_method(deployment, method)
    scheduler = started_without_workers(deployment, "--child-stop-timeout", str(LONG_GRACE),
                                        "--shutdown-timeout", str(LONG_GRACE + 30))
    # Under forkserver the server is the forkserver's child, not the job's: any listener in the tree.
    [server] = wait_for(lambda: scheduler.listening_on(deployment.log_port), 30, message="serve-logs")
    server.send_signal(signal.SIGKILL)
    wait_for(lambda: {p.pid for p in scheduler.listening_on(deployment.log_port)} - {server.pid}, 10,
             interval=0.2, message="a new serve-logs listening on the log port within 10 s")

    sent = scheduler.signal(signal.SIGTERM)
    code, took = assert_exits(scheduler, sent, LONG_GRACE + 30 + MARGIN)
    assert code == 0, scheduler.log()[-4000:]
    assert took < LONG_GRACE / 2, f"exited {took:.1f}s after SIGTERM: a child outwaited the grace"
    assert "Traceback" not in scheduler.log(), scheduler.log()[-4000:]
    assert_no_orphans(scheduler)

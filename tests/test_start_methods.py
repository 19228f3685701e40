"""Every start method (``[core] mp_start_method``: fork, forkserver, spawn) on Airflow 3.3 (fork and
spawn on 2.x, the kills only), with real tasks running: nothing is left after ``kill -9`` of the PID
the user started or of the job process, a DB stop ends in time, SIGTERM stops cleanly, a killed log
server listens again. The triggerer and the dag-processor: the same two kills under every method
but fork (their fork rows are ``test_components``' own).

Under ``forkserver`` (Python 3.14's default) and ``spawn`` the executor workers are not forked by
the job process, so no code of ours runs in them: only the parent above the job (``reaper``) can
tell that they outlived it.
"""

from __future__ import annotations

import signal
import time

import pytest

from procs import alive, wait_for
from safe_scheduler import compat
from test_components import COMPONENTS, started as component_started, wait_parsing, with_parsing_process
from test_faults import MARGIN, assert_exits, assert_no_orphans, kill, running_tasks, with_running_tasks

# 2.x reads ``[core] mp_start_method`` only for the scheduler's DAG-file processor (its manager and
# parsing processes); the executor's workers always fork there. 3.3 applies it to everything.
METHODS = ["fork", "forkserver", "spawn"] if compat.AIRFLOW_3 else ["fork", "spawn"]
# Under fork, the DB stop and the killed log server are test_faults' and test_servers' own tests.
NOT_FORK = [method for method in METHODS if method != "fork"]


def _with_method(deployment, method: str) -> None:
    deployment.env["AIRFLOW__CORE__MP_START_METHOD"] = method


def started(deployment, *args: str):
    """Heartbeating, with serve-logs listening (under spawn and forkserver LocalExecutor starts
    its workers only once there is work, so they are not waited for here)."""
    scheduler = deployment.scheduler(*args)
    scheduler.wait_healthy()
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")
    return scheduler


@pytest.mark.all_versions
@pytest.mark.parametrize("target", ["top", "job"])
@pytest.mark.parametrize("method", METHODS)
def test_sigkill_with_tasks_running_leaves_nothing(deployment, tmp_path, method, target):
    _with_method(deployment, method)
    marks = tmp_path / "marks"
    with_running_tasks(deployment, marks)
    scheduler = deployment.scheduler("--child-stop-timeout", "3")
    scheduler.wait_healthy()
    tasks = running_tasks(scheduler, marks)
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
    _with_method(deployment, method)
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = component_started(deployment, postgres, name)
    if name == "dag-processor":
        wait_parsing(proc)
    seen = len(proc.below_job())
    assert seen
    kill(proc, target)
    left = proc.survivors_after(30 + MARGIN)
    assert not left, f"{len(left)} of {seen + 1} outlived the {name}: " \
        f"{[(p.pid, ' '.join(p.cmdline())[:120]) for p in left]}"


@pytest.mark.parametrize("method", NOT_FORK)
def test_db_stop_ends_in_time(deployment, postgres, method):
    _with_method(deployment, method)
    scheduler = started(deployment, "--shutdown-timeout", "20")
    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(scheduler, fault, 20 + MARGIN)
    assert code == 1, scheduler.log()[-4000:]
    assert took < 20, f"took {took:.1f}s"
    assert_no_orphans(scheduler)


@pytest.mark.parametrize("method", NOT_FORK)
def test_killed_log_server_comes_back_and_sigterm_is_clean(deployment, method):
    _with_method(deployment, method)
    scheduler = started(deployment)
    # Under forkserver the server is the forkserver's child, not the job's: any listener in the tree.
    [server] = wait_for(lambda: scheduler.listening_on(deployment.log_port), 30, message="serve-logs")
    server.send_signal(signal.SIGKILL)
    wait_for(lambda: {p.pid for p in scheduler.listening_on(deployment.log_port)} - {server.pid}, 10,
             interval=0.2, message="a new serve-logs listening on the log port within 10 s")

    sent = scheduler.signal(signal.SIGTERM)
    code, _ = assert_exits(scheduler, sent, 30 + MARGIN)
    assert code == 0, scheduler.log()[-4000:]
    assert_no_orphans(scheduler)

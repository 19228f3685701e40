"""Safe for the work, not only the process: after a fault, the tasks in flight reach success at
least as fast as with stock Airflow.

* A scheduler killed with tasks running (``kill -9`` of the PID you started, or of its job
  process) frees its ports at once, so that a restart serves, and its tasks go on to finish their
  first try and report it; nothing of it is left once they have.
* After a container's end (every process of the scheduler killed at once), the restarted scheduler
  resets the dead job's task instances as soon as that job is known dead (Airflow's
  ``scheduler_health_check_threshold``), not at its next ``orphaned_tasks_check_interval`` (300 s).

Airflow's defaults, but for one setting, for time: ``scheduler_health_check_threshold`` is 20 s
(30 by default), so that a job is known dead while the tasks, 27 s each, still run. (A task is
told alive from dead by its own heartbeat, every 5 s: the threshold must leave it 10 s of silence
beyond the scheduler's own heartbeat interval.) The bench's
heal section measures the same faults against stock, with 16 tasks.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness.faults import running_tasks, task_states, tries_started, with_running_tasks
from harness.procs import port_free, wait_for

#: Seconds each task runs: longer than the threshold, shorter than ``orphaned_task_timeout``.
TASK_SECONDS = 27
THRESHOLD = "20"


def _scheduler_with_tasks(deployment, tmp_path, **kwargs):
    deployment.env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD"] = THRESHOLD
    marks = tmp_path / "marks"
    with_running_tasks(deployment, marks, seconds=TASK_SECONDS)
    scheduler = deployment.scheduler(**kwargs)
    scheduler.wait_healthy()
    running_tasks(scheduler, marks)
    return scheduler, marks


def _serves(deployment, scheduler) -> None:
    scheduler.wait_healthy()
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="the restart's serve-logs")


@pytest.mark.all_versions
@pytest.mark.parametrize("target", ["top", "job"])
def test_killed_scheduler_s_tasks_finish_their_first_try(deployment, postgres, tmp_path, target):
    """``top``: the job, told by its death signal, keeps its job row alive while its tasks finish.
    ``job``: its workers keep their tasks, and the restart adopts them alive instead of resetting
    them once the killed job is known dead."""
    scheduler, marks = _scheduler_with_tasks(deployment, tmp_path)
    if target == "top":
        scheduler.signal(signal.SIGKILL)
    else:
        os.kill(scheduler.job_pid, signal.SIGKILL)
    ports = (deployment.log_port, deployment.endpoint_port("scheduler"))
    wait_for(lambda: all(port_free(port) for port in ports), 5, message="the killed scheduler's ports to be free")
    restarted = deployment.scheduler()
    _serves(deployment, restarted)

    done = {("a", "success", 1), ("b", "success", 1)}
    wait_for(lambda: task_states(postgres) == done, TASK_SECONDS + 60, interval=0.5,
             message=f"both tasks to succeed on their first try (now {task_states(postgres)})")
    assert tries_started(marks) == {"a": 1, "b": 1}
    left = scheduler.survivors_after(20)
    assert not left, f"outlived their tasks: {[(p.pid, ' '.join(p.cmdline())[:100]) for p in left]}"
    if target == "job":
        assert scheduler.wait_exit(10) == 128 + signal.SIGKILL
    restarted.signal(signal.SIGTERM)
    assert restarted.wait_exit(60) == 0, restarted.log()[-3000:]


def test_after_a_container_s_end_the_work_is_reset_within_seconds(deployment, postgres, tmp_path):
    """Stock and the safe scheduler alike adopt nothing until the 300 s timer (issue 36's table:
    347.6 s to heal); ours resets the dead job's task instances at the threshold."""
    scheduler, marks = _scheduler_with_tasks(deployment, tmp_path, own_session=True)
    for watcher in scheduler.watchers:  # every process at once, none of them told: SIGSTOP, SIGKILL
        watcher.freeze()
        watcher.kill_survivors()
    killed = time.monotonic()
    restarted = deployment.scheduler()
    _serves(deployment, restarted)

    done = {("a", "success", 2), ("b", "success", 2)}
    wait_for(lambda: task_states(postgres) == done, 100, interval=0.5,
             message=f"both tasks to run again and succeed (now {task_states(postgres)})")
    healed = time.monotonic() - killed
    print(f"healed {healed:.1f}s after the container's end")
    assert tries_started(marks) == {"a": 2, "b": 2}
    restarted.signal(signal.SIGTERM)
    assert restarted.wait_exit(60) == 0, restarted.log()[-3000:]

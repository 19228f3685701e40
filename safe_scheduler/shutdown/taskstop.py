"""Running tasks on the way out: drained, told to stop, given their cleanup time, then killed.

With the LocalExecutor, tasks run below the job process. Stock Airflow's ``LocalExecutor.end()``
waits for every one of them to finish, forever; a deadline alone would wait until it passes and
then SIGKILL them, skipping the very cleanup (``on_kill``, ``on_termination``) that cancels their
external jobs, and report the stop as a hang. Instead, on every way out (the run ended, the
database went away, SIGTERM, a stall) this runs beside whatever the main thread is doing, even
when the main thread is stuck:

1. drain: up to ``task_drain_timeout`` seconds for the tasks to finish on their own (0 by default);
2. SIGTERM to the top process of each task, the child of an executor worker: Airflow 2's
   ``tasks run --local`` job and Airflow 3's task supervisor, each of which passes it on to the
   task process as it does when a task is marked failed, so that ``on_kill`` and
   ``on_termination`` run; a task that starts meanwhile gets it too;
3. up to ``task_cleanup_timeout`` seconds for them to end;
4. SIGKILL to what is left, with everything below it.

Steps 1 to 3 are cut so that the servers' stop and the final sweep still fit before the deadline,
by the same time plan that ``settings`` validated them with (``budget``): the stop of tasks is
planned, so it never costs a forced exit (code 3) by itself. After an unplanned end (the parent
died) the drain is the tasks' own time, ``orphaned_task_timeout``: they go on to their end and
report their own state, and only those still running after it are stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import psutil

from safe_scheduler.base import output, threads
from safe_scheduler.base.metrics import Metrics
from safe_scheduler.children import tree
from safe_scheduler.shutdown.owner import Shutdown

log = logging.getLogger("safe_scheduler.shutdown.taskstop")

#: Seconds between two looks at the running tasks.
POLL = 0.1


class TaskStop:
    """Stops the running tasks once, from its own thread, within the time it is given."""

    def __init__(self, find_tasks: Callable[[], list[psutil.Process]], shutdown: Shutdown, metrics: Metrics) -> None:
        """``find_tasks``: the top process of each running task. ``shutdown``: its time plan and
        its deadline, of which what comes after the tasks must be left."""
        self.find_tasks = find_tasks
        self.shutdown = shutdown
        self.metrics = metrics
        self._done = threading.Event()
        self._hurry = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self, reason: str = "") -> None:
        """Start stopping the tasks (a shutdown hook: called once shutdown starts, from any thread)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threads.start_daemon("safe-taskstop", self._run)

    def running(self) -> bool:
        """Whether any task runs now."""
        return any(tree.alive(p) for p in self.find_tasks())

    def hurry(self) -> None:
        """"Stop now" (a second signal): the drain ends at once; the cleanup time stays."""
        self._hurry.set()
        self.start()

    def wait(self) -> bool:
        """Wait until the tasks are stopped, or the time for it is over; True if they are.

        Starts the stop if nothing has yet (a shutdown that began before this was hooked to it).
        """
        self.start()
        return self._done.wait(self.shutdown.plan.executor_may_take(self.shutdown.remaining()))

    def _left(self) -> float:
        """Seconds for draining and cleanup: the deadline less what comes after, less our own kill."""
        return self.shutdown.plan.tasks_may_take(self.shutdown.remaining())

    def _run(self) -> None:
        try:
            self._stop_tasks()
        except Exception:  # noqa: BLE001 - the final sweep still stops them; say why this did not
            output.in_background(log.exception, "Stopping the running tasks failed")
        finally:
            self._done.set()

    def _stop_tasks(self) -> None:
        running = [p for p in self.find_tasks() if tree.alive(p)]
        if not running:
            return
        started = time.monotonic()
        plan = self.shutdown.plan
        output.in_background(
            log.warning, "%d task(s) running at shutdown (pids %s): %s",
            len(running), ", ".join(str(p.pid) for p in running),
            f"up to {plan.task_drain_timeout:g}s to finish, then SIGTERM" if plan.task_drain_timeout else "SIGTERM",
        )
        # The plan is read at each look: an unplanned end named meanwhile gives the tasks their own time.
        while (not self._hurry.is_set() and time.monotonic() - started < self.shutdown.plan.task_drain_timeout
               and self._left() > 0 and any(tree.alive(p) for p in self.find_tasks())):
            self._hurry.wait(POLL)

        signalled: dict[int, psutil.Process] = {}
        cleanup_until = time.monotonic() + min(self.shutdown.plan.task_cleanup_timeout, self._left())
        while True:
            current = [p for p in self.find_tasks() if tree.alive(p)]
            fresh = [p for p in current if p.pid not in signalled]
            tree.send(fresh, signal.SIGTERM, {})  # one we may not signal is named by tree.stop below
            signalled.update((p.pid, p) for p in fresh)
            if not current or time.monotonic() >= cleanup_until:
                break
            time.sleep(POLL)
        left = [p for p in self.find_tasks() if tree.alive(p)]
        outcome = tree.stop(left, grace=0.0, what="tasks past their cleanup time") if left else tree.Outcome()
        self.metrics.incr("tasks_stopped", len(signalled))
        self.metrics.incr("tasks_killed", len(outcome.killed))
        self.metrics.incr("children_killed", len(outcome.killed))
        output.in_background(
            log.warning if left else log.info,
            "Stopped %d task(s) in %.1fs: %d ended after SIGTERM, %d had to be killed",
            len(signalled), time.monotonic() - started, len(signalled) - len(left), len(left),
        )


def below(worker_pids: Callable[[], set[int]]) -> Callable[[], list[psutil.Process]]:
    """``find_tasks`` for executors that run each task in a child of a worker process of theirs."""

    def find() -> list[psutil.Process]:
        found = []
        for pid in worker_pids():
            try:
                found += psutil.Process(pid).children()
            except psutil.NoSuchProcess:
                continue
        return found

    return find

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

Steps 1 to 3 are cut so that the servers' stop and the final sweep still fit before the deadline:
the stop of tasks is planned, so it never costs a forced exit (code 3) by itself.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import psutil

from safe_scheduler import output, threads, tree
from safe_scheduler.metrics import Metrics
from safe_scheduler.settings import KILL_RESERVE, Settings

log = logging.getLogger("safe_scheduler.taskstop")

#: Seconds between two looks at the running tasks.
POLL = 0.1


class TaskStop:
    """Stops the running tasks once, from its own thread, within the time it is given."""

    def __init__(
        self,
        find_tasks: Callable[[], list[psutil.Process]],
        settings: Settings,
        remaining: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        """``find_tasks``: the top process of each running task. ``remaining``: seconds to the
        deadline, of which ``settings.after_tasks`` must be left for what comes after the tasks."""
        self.find_tasks = find_tasks
        self.task_drain_timeout = settings.task_drain_timeout
        self.task_cleanup_timeout = settings.task_cleanup_timeout
        self.after_tasks = settings.after_tasks
        self.remaining = remaining
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

    def hurry(self) -> None:
        """"Stop now" (a second signal): the drain ends at once; the cleanup time stays."""
        self._hurry.set()
        self.start()

    def wait(self) -> bool:
        """Wait until the tasks are stopped, or the time for it is over; True if they are.

        Starts the stop if nothing has yet (a shutdown that began before this was hooked to it).
        """
        self.start()
        return self._done.wait(max(0.0, self.remaining() - self.after_tasks))

    def _left(self) -> float:
        """Seconds for draining and cleanup: the deadline less what comes after, less our own kill."""
        return max(0.0, self.remaining() - self.after_tasks - KILL_RESERVE)

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
        output.in_background(
            log.warning, "%d task(s) running at shutdown (pids %s): %s",
            len(running), ", ".join(str(p.pid) for p in running),
            f"draining up to {self.task_drain_timeout:g}s, then SIGTERM" if self.task_drain_timeout else "SIGTERM",
        )
        drain_until = time.monotonic() + min(self.task_drain_timeout, self._left())
        while (time.monotonic() < drain_until and not self._hurry.is_set()
               and any(tree.alive(p) for p in self.find_tasks())):
            self._hurry.wait(POLL)

        signalled: dict[int, psutil.Process] = {}
        cleanup_until = time.monotonic() + min(self.task_cleanup_timeout, self._left())
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

"""The stop's time plan: how the ``shutdown_timeout`` deadline is spent, worked out in one place.

The stop, in order, and what each step may take (T ``shutdown_timeout``, C ``child_stop_timeout``,
D ``task_drain_timeout``, K ``task_cleanup_timeout``, R ``KILL_RESERVE``)::

    | drain D | cleanup K | kill R | the servers' polite wait C | kill R | the sweep's kill R |
    |<------------------------------- the deadline, T --------------------------------->|

* drain: running tasks finish on their own;
* cleanup: SIGTERM, then ``on_kill`` and ``on_termination`` cleanups;
* kill: SIGKILL of what is left, with its tree, and the reap;
* the servers: SIGTERM, up to C, then their kill; the sweep: whatever else is below the job.

The executor's ``end()`` and the sweep's polite wait get whatever the tasks left unused. So the
tasks get at most T - C - 3R (``for_tasks``): ``settings.load`` accepts a config only if D + K fit
in it (``derive``), and the stop gives the tasks exactly that (``tasks_may_take``): the same
numbers, from the same functions.

After an unplanned end (the tiny parent died), running tasks go on for ``orphaned_task_timeout``
first, in place of the drain, and then the same stop follows: the deadline is O + T (``orphaned``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from safe_scheduler.base.errors import UsageError

#: Seconds every stop keeps, after its polite wait, for SIGKILL and the reap (``tree.KILL_WAIT``).
KILL_RESERVE = 1.0


@dataclass(frozen=True)
class TimePlan:
    shutdown_timeout: float
    child_stop_timeout: float
    task_drain_timeout: float = 0.0
    task_cleanup_timeout: float = 0.0
    #: Seconds running tasks go on after an unplanned end, before the stop (``orphaned``).
    orphaned_task_timeout: float = 0.0

    @property
    def after_tasks(self) -> float:
        """What must be left once the tasks are stopped: the servers' stop and kill, the sweep's kill."""
        return self.child_stop_timeout + 2 * KILL_RESERVE

    @property
    def for_tasks(self) -> float:
        """The most the drain and the cleanup may take together: the deadline less what comes after
        the tasks, less the tasks' own kill."""
        return max(0.0, self.shutdown_timeout - self.after_tasks - KILL_RESERVE)

    def tasks_may_take(self, remaining: float) -> float:
        """Seconds the drain and cleanup may still take, ``remaining`` seconds before the deadline."""
        return max(0.0, remaining - self.after_tasks - KILL_RESERVE)

    def executor_may_take(self, remaining: float) -> float:
        """Seconds the executor's ``end()`` may take once the tasks are stopped."""
        return max(0.0, remaining - self.after_tasks)

    @staticmethod
    def polite_room(remaining: float) -> float:
        """The longest polite wait (SIGTERM to SIGKILL) that still leaves its kill before the deadline."""
        return max(0.0, remaining - KILL_RESERVE)

    def orphaned(self, tasks_running: bool = True) -> TimePlan:
        """The plan after an unplanned end: the tasks' own time first, then the usual stop (with no
        task running, the usual stop alone)."""
        own = self.orphaned_task_timeout if tasks_running else 0.0
        return dataclasses.replace(self, shutdown_timeout=own + self.shutdown_timeout, task_drain_timeout=own)

    @property
    def orphans_gone_within(self) -> float:
        """Seconds after the job process died by which every process below it has ended, tasks
        included: their own time, their cleanup, a server's or worker's stop, and the kill."""
        return self.orphaned_task_timeout + self.task_cleanup_timeout + self.child_stop_timeout + KILL_RESERVE


def derive(shutdown_timeout: float, child_stop_timeout: float, drain: float | None, cleanup: float | None,
           cleanup_default: float) -> tuple[float, float]:
    """The drain and the cleanup, where one or both were not set: the cleanup is
    ``cleanup_default`` (or what is left), the drain whatever the deadline leaves after it.
    Refuses, with the real figures, a pair that the stop could not honour."""
    plan = TimePlan(shutdown_timeout, child_stop_timeout)
    if shutdown_timeout < plan.after_tasks + KILL_RESERVE - 1e-9:
        raise UsageError(
            f"shutdown_timeout ({shutdown_timeout:g}s) leaves running tasks no time to be stopped: it must be at "
            f"least child_stop_timeout ({child_stop_timeout:g}s) and 3 kills of {KILL_RESERVE:g}s, "
            f"{plan.after_tasks + KILL_RESERVE:g}s"
        )
    room = plan.for_tasks
    if drain is None and cleanup is None:
        cleanup = min(cleanup_default, room)
    if cleanup is None:
        cleanup = min(cleanup_default, max(0.0, room - (drain or 0.0)))
    if drain is None:
        drain = max(0.0, room - cleanup)
    if drain + cleanup > room + 1e-9:
        raise UsageError(
            f"task_drain_timeout ({drain:g}s) + task_cleanup_timeout ({cleanup:g}s) must not exceed what "
            f"shutdown_timeout ({shutdown_timeout:g}s) leaves the tasks: {room:g}s, after child_stop_timeout "
            f"({child_stop_timeout:g}s) and 3 kills of {KILL_RESERVE:g}s"
        )
    return drain, cleanup


def check_children(shutdown_timeout: float, child_stop_timeout: float) -> None:
    """Refuse a ``child_stop_timeout`` the stop could not honour within ``shutdown_timeout``."""
    if child_stop_timeout + 2 * KILL_RESERVE > shutdown_timeout + 1e-9:
        raise UsageError(
            f"child_stop_timeout ({child_stop_timeout:g}s) must not exceed shutdown_timeout "
            f"({shutdown_timeout:g}s) less two kills of {KILL_RESERVE:g}s: at most "
            f"{max(0.0, shutdown_timeout - 2 * KILL_RESERVE):g}s"
        )

"""The one owner of the shutdown: cause -> deadline -> outcome -> exit code.

Whatever notices that the job process must go (the main thread when the job returns or raises,
the signal listener, the stall watchdog, the executor's ``end()``) calls ``Shutdown.begin``. The
first call arms one deadline, the time plan's ``shutdown_timeout`` away (``budget``), and every
later step runs within what it leaves. The first *cause* named wins, and decides the exit code
through the one table (``exitcodes``). An unplanned end (the parent died) extends the deadline by
the tasks' own time, ``orphaned_task_timeout``, once, whenever it is named.

"The stop" is the same every time; ``core.runner`` reads it top to bottom: running tasks are
drained, told to stop and given their cleanup time (``taskstop``), the executor's ``end()`` gets
what is left, the servers are stopped together and everything else below us is swept.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from safe_scheduler.base import exitcodes, output, threads
from safe_scheduler.base.exitcodes import Cause
from safe_scheduler.base.metrics import Metrics
from safe_scheduler.shutdown import watchdog
from safe_scheduler.shutdown.budget import TimePlan

log = logging.getLogger("safe_scheduler.shutdown")

#: Seconds non-daemon threads get to finish once the job is over and its children are gone (less,
#: if the deadline is nearer).
THREAD_JOIN_GRACE = 1.5


def _first_failure(exc: BaseException | None) -> BaseException | None:
    """The first real error in ``exc``'s chain (not SystemExit or KeyboardInterrupt), to log."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            return exc
        seen.append(exc)
        exc = exc.__context__
    return None


class Shutdown:
    """The shutdown's state: its cause, its one deadline, its time plan, and how it ended."""

    def __init__(self, plan: TimePlan, name: str = "job", metrics: Metrics | None = None) -> None:
        #: The time plan this stop spends; the orphaned one once the parent is known gone.
        self.plan = plan
        #: What runs, for the log only ("scheduler"): the shutdown works the same for every job.
        self.name = name
        self.metrics = metrics or Metrics()
        self.backstops = watchdog.Backstops()
        self.cause: Cause | None = None
        self.reason: str | None = None
        self.started_at: float | None = None
        #: What the job's own way out asked for (``exitcodes.of_run``); None while the job still runs.
        self.run_code: int | None = None
        #: Called once with the reason when shutdown starts (systemd STOPPING=1, stall watchdog off).
        self.on_begin: list[Callable[[str], None]] = []
        #: Called on each "stop now" (a second SIGTERM, Celery's SIGQUIT): the drain ends at once.
        self.on_hurry: list[Callable[[], None]] = []
        #: Called once when the stop is known unplanned (the parent died), whenever that is named.
        self.on_orphaned: list[Callable[[], None]] = []
        #: Whether tasks run below the job now: only they get time of their own after an unplanned end.
        self.tasks_running: Callable[[], bool] = lambda: False
        self._lock = threading.Lock()

    @property
    def timeout(self) -> float:
        return self.plan.shutdown_timeout

    @property
    def unplanned(self) -> bool:
        """Whether nobody planned this stop (the parent died): tasks go on, ports go at once."""
        return self.cause is Cause.ORPHANED

    def begin(self, reason: str, cause: Cause | None = None) -> None:
        """Start the shutdown (the first call arms the deadline) and name its cause (the first wins).

        ``cause`` None only starts the clock: the executor's ``end()`` runs on every way out of
        Airflow's loop, before we know which way it was.
        """
        running = cause is Cause.ORPHANED and self.cause is None and self.tasks_running()
        with self._lock:
            orphaned = cause is Cause.ORPHANED and self.cause is None
            if cause is not None and self.cause is None:
                self.cause = cause
            if orphaned:
                self.plan = self.plan.orphaned(running)
            again = self.started_at is not None
            if again and orphaned:  # named after the clock started: the tasks' own time is added still
                self.backstops.arm(self.remaining())
            if not again:
                self.reason, self.started_at = reason, time.monotonic()
        # The deadline first, then hooks and logging: any of them can block (a logging lock left
        # held, a log write into a full pipe), and none of that may delay the deadline.
        if not again:
            self.backstops.arm(self.timeout)
            threads.start_daemon("safe-exit-wd", self._expire)
        if orphaned:
            self._call(self.on_orphaned)
        if again:
            return
        self._call(self.on_begin, reason)
        output.in_background(
            log.info, "Shutdown started (%s); the process will be gone within %gs", reason, self.timeout
        )

    def hurry(self, reason: str) -> None:
        """"Stop now": start the shutdown if it has not started, and cut its drain short.

        Celery's meaning of a second signal or of SIGQUIT (a cold shutdown), and Airflow's "Signal
        again" for tasks. It is still the same stop with the same deadline: tasks get SIGTERM and
        their cleanup time at once instead of after the drain; nothing is killed sooner.
        """
        first = self.started_at is None
        self.begin(reason, Cause.SIGNAL)
        output.in_background(log.warning, "%s: %s", reason,
                             "stopping now, without a drain" if first else "stopping now (no more draining)")
        self._call(self.on_hurry)

    @staticmethod
    def _call(hooks: list[Callable[..., None]], *args: str) -> None:
        for callback in hooks:
            try:
                callback(*args)
            except Exception:  # noqa: BLE001 - a hook must not stop the shutdown
                output.in_background(log.exception, "shutdown hook failed")

    def run_ended(self, exc: BaseException | None) -> None:
        """The job is over, by a return or an exception: that is the cause unless another came first."""
        self.run_code = exitcodes.of_run(exc)
        self.begin(f"{type(exc).__name__} left the {self.name}" if exc is not None else f"the {self.name} ended",
                   Cause.RUN_ENDED)
        failure = _first_failure(exc)
        if failure is not None:
            log.error("%s failed: %s: %s", self.name.capitalize(), type(failure).__name__, failure, exc_info=failure)
        elif isinstance(exc, SystemExit) and exc.code is not None and not isinstance(exc.code, int):
            log.error("%s exited: %s", self.name.capitalize(), exc.code)

    def remaining(self) -> float:
        """Seconds until the deadline (the whole timeout before shutdown starts)."""
        if self.started_at is None:
            return self.timeout
        return max(0.0, self.started_at + self.timeout - time.monotonic())

    def took(self) -> float:
        return self.timeout - self.remaining()

    def exit_code(self, forced: bool = False) -> int:
        return exitcodes.of_stop(self.cause, self.run_code, forced)

    def _expire(self) -> None:
        while self.remaining() > 0:  # the deadline moves once, if the parent is found gone meanwhile
            time.sleep(self.remaining())
        kind = "stall" if self.cause is Cause.STALLED else "shutdown_deadline"
        watchdog.force_exit(
            self.exit_code(forced=True),
            f"shutdown did not finish within {self.timeout:g}s ({self.reason})",
            kind,
            self.metrics,
        )

    def report(self, ran_for: float) -> None:
        self.metrics.timing("shutdown_duration", self.took())
        log.info(
            "%s stopped after %.1fs; exit code %d (cause: %s; shutdown: %s, took %.1fs)",
            self.name.capitalize(), ran_for, self.exit_code(), self.cause.value if self.cause else "?",
            self.reason, self.took(),
        )


def leave(code: int, remaining: Callable[[], float] = lambda: THREAD_JOIN_GRACE) -> NoReturn:
    """Leave the interpreter with ``code``, even if a non-daemon thread would hold it.

    Python joins every non-daemon thread before exiting, forever. Once the job is over and its
    children are gone, such a thread can only be a leak (a plugin, a log shipper): give it a
    moment (within what the deadline leaves), name it, run the atexit handlers ourselves (still
    under the deadline), and go.
    """
    main = threading.main_thread()
    deadline = time.monotonic() + max(0.0, min(THREAD_JOIN_GRACE, remaining()))
    blockers = [t for t in threading.enumerate() if t is not main and not t.daemon]
    for thread in blockers:
        thread.join(max(0.0, deadline - time.monotonic()))
    blockers = [t for t in blockers if t.is_alive()]
    if not blockers:
        raise SystemExit(code)
    log.warning(
        "Non-daemon thread(s) would block interpreter exit: %s; exiting with code %d without them",
        ", ".join(f"{t.name!r} ({t.ident})" for t in blockers),
        code,
    )
    try:
        atexit._run_exitfuncs()
    finally:
        output.flush_logs()
        os._exit(code)  # the interpreter's own exit would join the threads named above, forever

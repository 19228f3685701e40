"""The one owner of the shutdown: cause → deadline → outcome → exit code.

Whatever notices that the job process must go (the main thread when the job returns or raises,
the signal listener, the stall watchdog, the executor's ``end()``) calls ``Shutdown.begin``. The
first call arms one deadline, ``shutdown_timeout`` seconds away, and every later step (stopping the
servers, the final sweep, the exit itself) runs within what it leaves. The first *cause* named
wins; ``exit_code`` maps it, and nothing else in the package decides an exit code.

"The stop" below is the same every time: running tasks get SIGTERM and their cleanup time
(``taskstop``), the executor's ``end()`` gets what is left, the servers are stopped together and
everything else below us is swept (``tree.stop``), all within the one deadline.

| cause                              | noticed by                  | what runs                          | exit code |
| ---------------------------------- | --------------------------- | ---------------------------------- | --------- |
| the job returned (``--num-runs``)  | main thread                 | the stop, exit                     | 0         |
| the job raised (DB gone, a bug)    | main thread                 | the stop, exit                     | 1         |
| the job raised ``SystemExit(n)``   | main thread                 | the stop, exit                     | n         |
| SIGTERM / SIGINT                   | signal listener (wakeup fd) | Airflow's handler unwinds; the stop | 0        |
| no heartbeat for ``stall_timeout`` | stall watchdog              | SIGTERM to itself; the stop        | 4         |
| any of these, past the deadline    | exit watchdog thread        | SIGKILL the tree, stacks, exit     | 3 (4 for a stall) |
| the GIL held past deadline + 5 s   | faulthandler's C thread     | stacks to stderr, ``_exit``        | 1         |
| faulthandler blocked too (+ 3 s)   | the kernel (``alarm``)      | SIGALRM ends the process           | killed by SIGALRM |
| bad input before start             | ``cli``                     | nothing starts                     | 2         |

A cause beats what happens while unwinding from it: SIGTERM is a clean stop (0) even if the
database connection breaks on the way out, and a stall stays a stall (4) whatever the job raises
once Airflow's handler interrupts it.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from safe_scheduler import exitcodes, output, threads, watchdog
from safe_scheduler.metrics import Metrics

log = logging.getLogger("safe_scheduler.shutdown")

#: Seconds non-daemon threads get to finish once the job is over and its children are gone.
THREAD_JOIN_GRACE = 1.5


class Cause(enum.Enum):
    """Why the job process is going, in the words the log uses."""

    RUN_ENDED = "the job ended"
    SIGNAL = "a signal"
    STALLED = "no heartbeat"


def code_of(exc: BaseException | None) -> int:
    """The exit code a way out of the job asks for: 0 for a return, else from the exception.

    A second exception raised while handling the first (SIGTERM's SystemExit(0) during the cleanup
    of a database error, or the reverse) does not change what ended the run: the first one decides.
    """
    if exc is None:
        return exitcodes.OK
    chain = [exc]
    while chain[-1].__context__ is not None and chain[-1].__context__ not in chain:
        chain.append(chain[-1].__context__)
    root = chain[-1]
    if isinstance(root, SystemExit):
        if root.code is None or isinstance(root.code, int):
            return root.code or exitcodes.OK
        return exitcodes.FAILED
    if isinstance(root, KeyboardInterrupt):
        return exitcodes.OK
    return exitcodes.FAILED


def _first_failure(exc: BaseException | None) -> BaseException | None:
    """The first real error in ``exc``'s chain (not SystemExit or KeyboardInterrupt), to log."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            return exc
        seen.append(exc)
        exc = exc.__context__
    return None


def exit_code(cause: Cause | None, run_code: int | None, forced: bool) -> int:
    """The one mapping from how the shutdown went to the process's exit code (table above)."""
    if cause is Cause.STALLED:
        return exitcodes.STALLED
    if forced:
        return exitcodes.FORCED
    if cause is Cause.SIGNAL:
        return exitcodes.OK
    return exitcodes.FAILED if run_code is None else run_code


class Shutdown:
    """The shutdown's state: its cause, its one deadline, and how it ended."""

    def __init__(self, timeout: float, name: str = "job", metrics: Metrics | None = None) -> None:
        self.timeout = timeout
        #: What runs, for the log only ("scheduler"): the shutdown works the same for every job.
        self.name = name
        self.metrics = metrics or Metrics()
        self.backstops = watchdog.Backstops()
        self.cause: Cause | None = None
        self.reason: str | None = None
        self.started_at: float | None = None
        #: What the job's own way out asked for (``code_of``); None while the job still runs.
        self.run_code: int | None = None
        #: Called once with the reason when shutdown starts (systemd STOPPING=1, stall watchdog off).
        self.on_begin: list[Callable[[str], None]] = []
        #: Called on each "stop now" (a second SIGTERM, Celery's SIGQUIT): the drain ends at once.
        self.on_hurry: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def begin(self, reason: str, cause: Cause | None = None) -> None:
        """Start the shutdown (the first call arms the deadline) and name its cause (the first wins).

        ``cause`` None only starts the clock: the executor's ``end()`` runs on every way out of
        Airflow's loop, before we know which way it was.
        """
        with self._lock:
            if cause is not None and self.cause is None:
                self.cause = cause
            if self.started_at is not None:
                return
            self.reason, self.started_at = reason, time.monotonic()
        # The deadline first, then hooks and logging: any of them can block (a logging lock left
        # held, a log write into a full pipe), and none of that may delay the deadline.
        self.backstops.arm(self.timeout)
        threads.start_daemon("safe-exit-wd", self._expire)
        for callback in self.on_begin:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - a hook must not stop the shutdown
                output.in_background(log.exception, "shutdown hook failed")
        output.in_background(
            log.info, "Shutdown started (%s); the process will be gone within %gs", reason, self.timeout
        )

    def hurry(self, reason: str) -> None:
        """"Stop now": start the shutdown if it has not started, and cut its drain short.

        Celery's meaning of a second signal or of SIGQUIT (a cold shutdown), and Airflow's "Signal
        again" for tasks. It is still the same stop with the same deadline: tasks get SIGTERM and
        their cleanup time at once instead of after the drain; nothing is killed sooner.
        """
        self.begin(reason, Cause.SIGNAL)
        output.in_background(log.warning, "%s: stopping now (no more draining)", reason)
        for callback in self.on_hurry:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a hook must not stop the shutdown
                output.in_background(log.exception, "shutdown hurry hook failed")

    def run_ended(self, exc: BaseException | None) -> None:
        """The job is over, by a return or an exception: that is the cause unless another came first."""
        self.run_code = code_of(exc)
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
        return exit_code(self.cause, self.run_code, forced)

    def _expire(self) -> None:
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
            self.name.capitalize(), ran_for, self.exit_code(), self.cause.value if self.cause else "?", self.reason, self.took(),
        )


def leave(code: int) -> NoReturn:
    """Leave the interpreter with ``code``, even if a non-daemon thread would hold it.

    Python joins every non-daemon thread before exiting, forever. Once the job is over and its
    children are gone, such a thread can only be a leak (a plugin, a log shipper): give it a
    moment, name it, run the atexit handlers ourselves (still under the deadline), and go.
    """
    main = threading.main_thread()
    deadline = time.monotonic() + THREAD_JOIN_GRACE
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
        os._exit(code)

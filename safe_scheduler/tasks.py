"""Task code that cancels its external work when the task is stopped: no ghost jobs.

A task that starts work elsewhere (a cloud job, a Spark submit, a long HTTP request) and is then
stopped — SIGTERM because it was marked failed or cleared, because its worker or scheduler shuts
down, SIGINT, or an ``execution_timeout`` — leaves that job running, and the retry starts a second
one. The usual advice, ``signal.signal(SIGTERM, handler)`` inside the task, silently replaces
Airflow's own handler (which runs ``on_kill`` and records the state). This module chains instead::

    from safe_scheduler.tasks import on_termination

    def run_training():
        with on_termination() as stop:
            job_id = client.start_job(...)
            stop.add(client.cancel_job, job_id)
            client.wait(job_id)

    @on_termination(cleanup_scratch_bucket)      # also a decorator
    def prepare(): ...

Cleanups run when the task process gets SIGTERM or SIGINT while the block runs, or when the block
is left by an exception (Airflow's task timeout included); never on success. Then the handler that
was installed before runs, exactly as if we were not there. Nested blocks run innermost first;
within a block, the last added runs first. Each cleanup runs at most once, even on a second
signal; each is bounded by ``timeout`` seconds; an error in one is logged and the others still run.

A cleanup added after the signal came runs at once. The signal can land while the call that starts
the job is still waiting for its id, and Airflow 3's handler only calls ``on_kill``: the task goes
on, learns the id, and adds its cancel to a block that has already been stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("safe_scheduler.tasks")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Seconds a single cleanup may take before the task stops waiting for it.
DEFAULT_TIMEOUT = 30.0


def _run_bounded(func: Callable[[], Any], name: str, timeout: float) -> None:
    """Run ``func`` in a helper thread and wait at most ``timeout``; log what went wrong."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            func()
        except BaseException as exc:  # noqa: BLE001 - reported below, must not kill the others
            errors.append(exc)

    worker = threading.Thread(target=target, name=f"cleanup:{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.error("Cleanup %s did not finish within %gs; leaving it behind", name, timeout)
    elif errors:
        log.error("Cleanup %s failed: %r", name, errors[0], exc_info=errors[0])
    else:
        log.info("Cleanup %s done", name)


class on_termination(contextlib.ContextDecorator):  # noqa: N801 - reads as a phrase at the call site
    """Run cleanups if the task is stopped or fails inside this block, then let Airflow handle it."""

    def __init__(self, cleanup: Callable[..., Any] | None = None, *args: Any, timeout: float = DEFAULT_TIMEOUT,
                 **kwargs: Any) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be more than zero seconds, got {timeout!r}")
        self.timeout = timeout
        self._initial = (cleanup, args, kwargs)
        self._cleanups: list[tuple[str, Callable[[], Any]]] = []  # not run yet; taken off as they run
        self._stopped_by: str | None = None  # why the cleanups ran: set once, never cleared in a block
        self._lock = threading.Lock()
        self._previous: dict[int, Any] = {}

    def add(self, cleanup: Callable[..., Any], *args: Any, **kwargs: Any) -> on_termination:
        """Register ``cleanup(*args, **kwargs)``; cleanups added later run first.

        Added after the block was stopped, it runs now: the job it cancels was started too late
        to be cancelled with the others, and nobody else would cancel it.
        """
        name = getattr(cleanup, "__qualname__", repr(cleanup))
        self._cleanups.append((name, functools.partial(cleanup, *args, **kwargs)))
        if self._stopped_by is not None:
            log.warning("Task already stopped (%s): running cleanup %s now", self._stopped_by, name)
            self._run_pending()
        return self

    def run_cleanups(self, why: str) -> None:
        """Run every registered cleanup once, last added first, each bounded by the timeout."""
        if self._stopped_by is None:
            self._stopped_by = why
            if self._cleanups:
                log.warning("Task stopped (%s): running %d cleanup(s)", why, len(self._cleanups))
        self._run_pending()

    def _run_pending(self) -> None:
        """Take each cleanup off the list before running it, so that none runs twice."""
        # Never wait for the lock: a second signal runs this handler again in the same thread, on
        # top of the first, and a blocking acquire there would deadlock. Whoever holds it is below
        # us on this stack and runs whatever is still on the list once we return.
        if not self._lock.acquire(blocking=False):
            return
        try:
            while self._cleanups:
                name, cleanup = self._cleanups.pop()
                _run_bounded(cleanup, name, self.timeout)
        finally:
            self._lock.release()

    # -- signals ---------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self._pid:  # a forked child inherits the handler, not the job
            self.run_cleanups(signal.Signals(signum).name)
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            # What would have happened without us: the default action, i.e. the process ends.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> on_termination:
        self._stopped_by = None
        self._cleanups = []
        cleanup, args, kwargs = self._initial
        if cleanup is not None:
            self.add(cleanup, *args, **kwargs)
        self._pid = os.getpid()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            log.warning("on_termination outside the main thread: cleanups run on exceptions only")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, previous in self._previous.items():
            # Put back what was there, unless someone installed their own handler on top of ours.
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous = {}
        if exc_type is not None:
            self.run_cleanups(f"{exc_type.__name__} left the block")

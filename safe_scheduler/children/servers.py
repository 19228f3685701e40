"""The job process's servers (serve-logs, health check): started together, watched, restarted,
stopped together.

Stock Airflow only ``terminate()``s these children, and before Airflow 2.7 not even on an
exception; ``multiprocessing`` then ``join()``s them forever at interpreter exit (Airflow #32706).
Here they are stopped on every way out of the block (return, exception, ``SystemExit``, signal)
through ``tree.stop``: all of them at once, within the time the shutdown deadline leaves.

While the job runs, a server that dies (the OOM killer's pick, a crash) is noticed at once: a
thread waits on the servers' sentinels (within 5 s where the server's own children outlive it and
hold its sentinel open). One log line with its exit code or signal, and a metric. Stock Airflow
notices nothing, and in Kubernetes a running task's log stays dark until the pod is replaced. It is
started again after a backoff (1 s, doubling up to 60 s while it keeps dying; back to 1 s once it
has run for 60 s), from the main thread, at the job's next heartbeat: a fork from the main thread
is the one that gets the death signal, and scheduling never waits for it. One that cannot come back
(its port is taken) keeps being retried at the longest backoff, with a line and a metric each time,
and the scheduler keeps scheduling: a log server matters less than the schedule, and a restart of
the whole scheduler would not free the port either.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from safe_scheduler.base import compat
from safe_scheduler.base import output
from safe_scheduler.base import threads
from safe_scheduler.children import tree
from safe_scheduler.base.metrics import Metrics
from safe_scheduler.base.prctl import set_death_signal

log = logging.getLogger("safe_scheduler.children")

#: Seconds between two looks at the servers' exit codes when no sentinel says anything: a server
#: whose own children outlive it (they hold its sentinel open) is still noticed.
SLOW_LOOK = 5.0
#: Seconds a closed sentinel's process is given to become reapable.
ZOMBIE_WAIT = 0.5
#: Seconds to wait before the first restart, doubled for each death in a row, up to the maximum.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
#: A server that has run this long counts as healthy again: its next death starts the backoff over.
STABLE_AFTER = 60.0


def _server_main(target: Callable[[], Any]) -> None:
    # A server has nothing to clean up, and a server left behind keeps its port (Airflow #40726):
    # its death signal (``forkhook``: SIGTERM, from the fork hook or ``arm``, race-free) becomes
    # SIGKILL. Whatever parent it has now is the one it had then, or that one's death was signalled.
    try:
        set_death_signal(signal.SIGKILL, os.getppid())
    except OSError as exc:
        log.warning("server gets no death signal (prctl: %s)", exc.strerror or exc)
    compat.forget_inherited_db_connections()
    target()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "is gone"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class ChildProcess:
    """A server child, run by multiprocessing (so Airflow's own start method and context apply)."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        self.name = name
        self.target = target
        self.process = self._new_process()
        self.started_at = 0.0
        #: Deaths in a row (reset once it has run for STABLE_AFTER), and when it may start again.
        self.deaths = 0
        self.restart_at: float | None = None

    def _new_process(self) -> multiprocessing.Process:
        return multiprocessing.Process(target=_server_main, args=(self.target,), name=self.name)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def metric_name(self) -> str:
        return self.name.replace("-", "_")

    def start(self) -> None:
        self.process.start()
        self.started_at = time.monotonic()
        log.info("Started %s (pid %s)", self.name, self.process.pid)

    def psutil_process(self) -> psutil.Process | None:
        if self.process.pid is None or self.process.exitcode is not None:
            return None
        try:
            return psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            return None


def stop_all(children: list[ChildProcess], child_stop_timeout: float,
             room: Callable[[], float] | None = None) -> tree.Outcome:
    """Stop every child and its tree together: SIGTERM, one wait of ``child_stop_timeout``, SIGKILL, reap."""
    procs = [p for p in (c.psutil_process() for c in children) if p is not None]
    outcome = tree.stop(procs, child_stop_timeout, room, what=", ".join(c.name for c in children))
    for child in children:
        if child.process.pid is not None:
            child.process.join(0.5)  # reaped already by tree.stop; this records the exit code
            log.info("Stopped %s (pid %s, exit code %s)", child.name, child.process.pid, child.process.exitcode)
    return outcome


def _exitcode(process: multiprocessing.Process, seconds: float) -> int | None:
    """Its exit code, polled (never a blocking wait) for up to ``seconds``: a process closes its
    sentinel a moment before the kernel makes it a zombie. None if it is still not reaped (or was
    reaped by someone else)."""
    deadline = time.monotonic() + seconds
    while process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return process.exitcode


class Servers:
    """The servers for the duration of the job: a watcher thread notices deaths, the job's main
    thread restarts them (``restart_due``, called on each heartbeat)."""

    def __init__(self, children: list[ChildProcess], metrics: Metrics | None = None) -> None:
        self.children = children
        self.metrics = metrics or Metrics()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Wakes the watcher when the set of processes to wait on changes (a restart, the stop).
        # Non-blocking: a full pipe already means "look again", and nothing here may block.
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self) -> None:
        for child in self.children:
            child.start()
        if self.children:
            threads.start_daemon("safe-children", self._watch)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    def _watched(self) -> list[Any]:
        """The sentinels of the servers that run (not those waiting for their restart), and the pipe."""
        with self._lock:
            running = [c.process.sentinel for c in self.children if c.restart_at is None and c.process.pid is not None]
        return [*running, self._wake_read]

    def _watch(self) -> None:
        while not self._stopping.is_set():
            ready = set(multiprocessing.connection.wait(self._watched(), timeout=SLOW_LOOK))
            if self._wake_read in ready:
                with contextlib.suppress(OSError):
                    os.read(self._wake_read, 4096)
            for child in self.children:
                with self._lock:
                    if self._stopping.is_set() or child.restart_at is not None:
                        continue
                    # A closed sentinel is a server gone: its exit code follows within moments.
                    exitcode = _exitcode(child.process, ZOMBIE_WAIT if child.process.sentinel in ready else 0.0)
                    if exitcode is None and child.process.sentinel not in ready:
                        continue
                    lived = time.monotonic() - child.started_at
                    child.deaths = 1 if lived >= STABLE_AFTER else child.deaths + 1
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (child.deaths - 1))
                    child.restart_at = time.monotonic() + delay
                self.metrics.incr(f"child_exited.{child.metric_name}")
                output.in_background(
                    log.error, "%s (pid %s) %s after %.0fs; starting it again in %gs (death %d in a row)",
                    child.name, child.pid, _how_it_ended(exitcode), lived, delay, child.deaths,
                )

    def restart_due(self) -> None:
        """Start again every server whose backoff is over (from the main thread, so that it gets
        the death signal like the first one)."""
        now = time.monotonic()
        for child in self.children:
            with self._lock:
                if self._stopping.is_set() or child.restart_at is None or now < child.restart_at:
                    continue
                child.restart_at = None
                child.process = child._new_process()
                try:
                    child.start()
                except Exception:  # noqa: BLE001 - scheduling must not fail because a server did
                    child.restart_at = now + BACKOFF_MAX
                    log.exception("Could not start %s again; next try in %gs", child.name, BACKOFF_MAX)
                    continue
            self._wake()  # its new sentinel is to be watched
            self.metrics.incr(f"child_restarted.{child.metric_name}")

    def stop(self, child_stop_timeout: float, room: Callable[[], float] | None = None) -> tree.Outcome:
        """No more restarts; stop every server that runs, together."""
        self._stopping.set()
        self._wake()
        with self._lock:
            outcome = stop_all(self.children, child_stop_timeout, room)
        self.metrics.incr("children_killed", len(outcome.killed))
        return outcome


@contextlib.contextmanager
def running(
    servers: list[tuple[str, Callable[[], Any]]], child_stop_timeout: float,
    room: Callable[[], float] | None = None, metrics: Metrics | None = None,
) -> Iterator[Servers]:
    """Run each ``(name, target)`` in a child for the duration of the block; stop all on every way out."""
    group = Servers([ChildProcess(name, target) for name, target in servers], metrics)
    try:
        group.start()
        yield group
    finally:
        group.stop(child_stop_timeout, room)

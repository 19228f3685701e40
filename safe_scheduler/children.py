"""The job process's servers (serve-logs, health check): started together, stopped together.

Stock Airflow only ``terminate()``s these children, and before Airflow 2.7 not even on an
exception; ``multiprocessing`` then ``join()``s them forever at interpreter exit (Airflow #32706).
Here they are stopped on every way out of the block (return, exception, ``SystemExit``, signal)
through ``tree.stop``: all of them at once, within the time the shutdown deadline leaves.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from safe_scheduler import forkhook, tree

log = logging.getLogger("safe_scheduler.children")


def _server_main(target: Callable[[], Any]) -> None:
    # A server has nothing to clean up, and a server left behind keeps its port (Airflow #40726).
    try:
        forkhook.set_death_signal(signal.SIGKILL, forkhook._job_pid)
    except OSError as exc:
        log.warning("server gets no death signal (prctl: %s)", exc.strerror or exc)
    target()


class ChildProcess:
    """A server child, run by multiprocessing (so Airflow's own start method and context apply)."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        self.name = name
        self.process = multiprocessing.Process(target=_server_main, args=(target,), name=name)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> None:
        self.process.start()
        log.info("Started %s (pid %s)", self.name, self.process.pid)

    def psutil_process(self) -> psutil.Process | None:
        if self.process.pid is None or self.process.exitcode is not None:
            return None
        try:
            return psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            return None


def stop_all(children: list[ChildProcess], grace: float, remaining: Callable[[], float] | None = None) -> tree.Outcome:
    """Stop every child and its tree together: SIGTERM, one wait of ``grace``, SIGKILL, reap."""
    procs = [p for p in (c.psutil_process() for c in children) if p is not None]
    outcome = tree.stop(procs, grace, remaining, what=", ".join(c.name for c in children))
    for child in children:
        if child.process.pid is not None:
            child.process.join(0.5)  # reaped already by tree.stop; this records the exit code
            log.info("Stopped %s (pid %s, exit code %s)", child.name, child.process.pid, child.process.exitcode)
    return outcome


@contextlib.contextmanager
def running(
    servers: list[tuple[str, Callable[[], Any]]], grace: float, remaining: Callable[[], float] | None = None
) -> Iterator[list[ChildProcess]]:
    """Run each ``(name, target)`` in a child for the duration of the block; stop all on every way out."""
    children: list[ChildProcess] = []
    try:
        for name, target in servers:
            child = ChildProcess(name, target)
            children.append(child)
            child.start()
        yield children
    finally:
        stop_all(children, grace, remaining)

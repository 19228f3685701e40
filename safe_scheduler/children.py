"""Child processes that cannot outlive the scheduler.

Two mechanisms, because neither is enough alone:

* While the scheduler is alive to do it, every exit path stops its children in bounded time:
  SIGTERM, join up to a timeout, SIGKILL the child's whole process tree, reap. Stock Airflow only
  ``terminate()``s and then leaves ``multiprocessing`` to ``join()`` forever at interpreter exit
  (Airflow #32706).
* When the scheduler cannot do it (SIGKILL, OOM killer, a forced exit), the kernel does: each child
  forked by the scheduler gets ``PR_SET_PDEATHSIG``. Task-running executor workers get SIGTERM, so a
  task can still clean up (``on_kill``); our servers get SIGKILL, so none keeps holding its port
  (Airflow #40726).

A death signal can be caught, though, and Airflow catches it: a worker that is supervising a task
forwards SIGTERM to the task and carries on, and the task runs ``on_kill`` and carries on too. So
every direct child also holds the read end of a *lifeline*, a pipe whose write end only the
scheduler keeps open. It reads as end-of-file the moment the scheduler is gone, however it died; the
child then allows ``orphan_grace`` seconds for that graceful path and kills its tree and itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from safe_scheduler import exitcodes, metrics, threads
from safe_scheduler.prctl import PR_SET_PDEATHSIG, prctl

log = logging.getLogger("safe_scheduler.children")

#: Signal the kernel sends a forked child when the scheduler dies: SIGTERM lets tasks clean up.
DEFAULT_DEATH_SIGNAL = signal.SIGTERM
#: Seconds an orphaned child waits for its last log line before it exits anyway.
LOG_GRACE = 1.0

_hook_installed = False
_scheduler_pid = 0
_forking_parent_pid = 0
_forked_from_main_thread = False
#: Run in every child right after fork, before anything else (see ``watchdog``).
_after_fork_callbacks: list[Callable[[], None]] = []
#: The lifeline's ends; -1 where this process does not hold that end.
_lifeline_read = -1
_lifeline_write = -1
#: Seconds an orphaned child allows its own graceful shutdown before it kills its tree.
_orphan_grace = 5.0


def set_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies (Linux only).

    If the parent is already gone by the time we ask (it died between fork and here), the request
    would never fire: deliver ``sig`` to ourselves at once instead.
    """
    if not prctl(PR_SET_PDEATHSIG, int(sig)):
        return False
    if _forking_parent_pid and os.getppid() != _forking_parent_pid:
        os.kill(os.getpid(), sig)
    return True


def _before_fork() -> None:
    global _forking_parent_pid, _forked_from_main_thread
    _forking_parent_pid = os.getpid()
    _forked_from_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    global _lifeline_read, _lifeline_write
    for callback in _after_fork_callbacks:
        callback()
    if _lifeline_write >= 0:
        os.close(_lifeline_write)  # only the scheduler may hold it, or the pipe never reads as closed
        _lifeline_write = -1
    if _forking_parent_pid == _scheduler_pid:
        if _lifeline_read >= 0:
            threads.start_daemon("safe-orphan-wd", _exit_when_orphaned, _lifeline_read)
        # The scheduler's SIGTERM handler is inherited by fork but meant for the scheduler only:
        # Airflow's ``_exit_gracefully`` does nothing outside the parent, so an executor worker
        # would ignore SIGTERM, its death signal included. Give the child the default disposition
        # it would have had if spawned; the task processes it starts install their own handlers.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elif _lifeline_read >= 0:
        os.close(_lifeline_read)  # a grandchild: its parent watches the lifeline for it
        _lifeline_read = -1
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process. A child forked by
    # a short-lived helper thread would be killed when that thread ends, so only children forked by
    # the main thread (serve-logs, health check, executor workers) are tied to us by the kernel.
    # The others are still stopped by ``stop_descendants`` on every exit path we live through.
    if _forked_from_main_thread:
        set_death_signal(DEFAULT_DEATH_SIGNAL)


def install_fork_hook(orphan_grace: float = 5.0) -> None:
    """Make every process forked from now on (and, inherited, from its children) die with its parent.

    ``orphan_grace``: how long a child whose scheduler is gone waits for its own graceful shutdown
    (a task's ``on_kill``) before it kills its process tree and exits.
    """
    global _hook_installed, _scheduler_pid, _lifeline_read, _lifeline_write, _orphan_grace
    if _hook_installed or not hasattr(os, "register_at_fork"):
        return
    _scheduler_pid = os.getpid()
    _orphan_grace = orphan_grace
    _lifeline_read, _lifeline_write = os.pipe()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _hook_installed = True


def _exit_when_orphaned(read_end: int) -> None:
    """In a direct child: block until the scheduler is gone, then make sure this child follows it."""
    try:
        while os.read(read_end, 1):  # nobody ever writes: this returns b"" once the scheduler is gone
            pass
    except OSError:
        return
    # Logging here may never return (this child's main thread can hold its lock), so it runs beside.
    threads.start_daemon(
        "safe-orphan-log", log.warning,
        "Scheduler (pid %d) is gone; pid %d exits within %gs, its own shutdown first",
        _scheduler_pid, os.getpid(), _orphan_grace,
    )
    time.sleep(_orphan_grace)
    killed = kill_descendants()
    threads.run_bounded(
        "safe-orphan-log", LOG_GRACE, log.warning,
        "Killed %d process(es) below pid %d, which outlived the scheduler", killed, os.getpid(),
    )
    os._exit(exitcodes.FAILED)


def run_after_fork_in_child(callback: Callable[[], None]) -> None:
    """Register ``callback`` to run first thing in every forked child (needs ``install_fork_hook``)."""
    _after_fork_callbacks.append(callback)


def _server_main(target: Callable[[], Any]) -> None:
    # A server has nothing to clean up, and a server left behind keeps its port (Airflow #40726).
    set_death_signal(signal.SIGKILL)
    target()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until ``procs`` are dead (zombies count as dead); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


class ChildProcess:
    """A server child (serve-logs, health check) with a stop that always finishes in bounded time."""

    def __init__(self, name: str, target: Callable[[], Any], stop_timeout: float) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self._process = multiprocessing.Process(target=_server_main, args=(target,), name=name)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> None:
        self._process.start()
        log.info("Started %s (pid %s)", self.name, self._process.pid)

    def stop(self) -> bool:
        """SIGTERM → join up to ``stop_timeout`` → SIGKILL the whole tree → reap.

        Returns True if the tree had to be killed. The child's descendants are listed before it is
        signalled: once it is dead they are re-parented and no longer findable from here.
        """
        process = self._process
        if process.pid is None or process.exitcode is not None:
            return False
        tree = _descendants(process.pid)
        process.terminate()
        process.join(self.stop_timeout)
        killed = process.is_alive()
        if killed:
            log.warning(
                "%s (pid %s) did not stop within %gs of SIGTERM; killing its process tree",
                self.name,
                process.pid,
                self.stop_timeout,
            )
            tree += [p for p in _descendants(process.pid) if p not in tree]
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        leftovers = [p for p in tree if _alive(p)]
        _signal_all(leftovers, signal.SIGKILL)
        # SIGKILL cannot be ignored; only a process stuck in the kernel (D state) outlives this join.
        process.join(max(self.stop_timeout, 1.0))
        _wait_gone(leftovers, 1.0)
        log.info("Stopped %s (pid %s, exit code %s)", self.name, process.pid, process.exitcode)
        if killed or leftovers:
            metrics.incr("children_killed", int(killed) + len(leftovers))
        return killed or bool(leftovers)


@contextlib.contextmanager
def supervised(name: str, target: Callable[[], Any], stop_timeout: float) -> Iterator[ChildProcess]:
    """Run ``target`` in a child for the duration of the block; stop it on every way out."""
    child = ChildProcess(name, target, stop_timeout)
    child.start()
    try:
        yield child
    finally:
        child.stop()


def stop_descendants(timeout: float) -> int:
    """Stop every process still below us: SIGTERM, wait up to ``timeout``, SIGKILL, reap.

    The last sweep before exit. Executor workers that ``executor.end()`` did not finish, a task
    process, a grandchild of a server: all are ours, and none may outlive the scheduler. Returns how
    many were still there.
    """
    procs = _descendants(os.getpid())
    if not procs:
        return 0
    log.warning(
        "%d child process(es) still running at shutdown (pids %s); stopping them",
        len(procs),
        ", ".join(str(p.pid) for p in procs),
    )
    _signal_all(procs, signal.SIGTERM)
    alive = _wait_gone(procs, timeout)
    if alive:
        log.warning("Killing %d process(es) that ignored SIGTERM: %s", len(alive), [p.pid for p in alive])
        metrics.incr("children_killed", len(alive))
        _signal_all(alive + [c for p in alive for c in _descendants(p.pid)], signal.SIGKILL)
        _wait_gone(alive, 1.0)
    # Let multiprocessing notice its dead children, so its own atexit join does not wait on them.
    multiprocessing.active_children()
    return len(procs)


def kill_descendants() -> int:
    """SIGKILL everything below us at once: the forced exit has no time left to be polite."""
    procs = _descendants(os.getpid())
    _signal_all(procs, signal.SIGKILL)
    return len(procs)

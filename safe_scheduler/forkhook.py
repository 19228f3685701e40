"""Children that die with the job process even when it cannot stop them (SIGKILL, OOM killer).

Two mechanisms, because neither is enough alone:

* Every child the job process forks from its main thread gets ``PR_SET_PDEATHSIG``: the kernel
  sends it SIGTERM when the job process dies, so a task can still clean up (``on_kill``).
* A death signal can be caught, and Airflow catches it: a worker that supervises a task forwards
  SIGTERM to the task and carries on, and the task runs ``on_kill`` and carries on too. So every
  direct child also holds the read end of a *lifeline*, a pipe whose write end only the job
  process keeps open. It reads as end-of-file the moment the job process is gone, however it
  died; the child then allows ``orphan_grace`` seconds for that graceful path and kills its tree
  and itself.

Both are set up by an ``os.register_at_fork`` hook, so they reach only processes this interpreter
forks itself (``os.fork``, multiprocessing's ``fork`` start method). Processes started by exec
(``subprocess``, the ``spawn`` and ``forkserver`` start methods) run none of it; every exit path
the job process lives through still stops them (``tree.stop``), and the parent above the job
(``reaper``) stops them once the job is gone, however it died.

Every decision the hook makes in the child is made from state the child owns, never from state a
before-fork hook wrote: CPython may release the GIL between the before-fork hooks and ``fork()``,
so two threads forking at once could swap such a value.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from safe_scheduler import exitcodes, output, threads, tree
from safe_scheduler.prctl import PR_SET_PDEATHSIG, death_signal, prctl

log = logging.getLogger("safe_scheduler.forkhook")

#: Signal the kernel sends a forked child when the job process dies: SIGTERM lets tasks clean up.
DEFAULT_DEATH_SIGNAL = signal.SIGTERM

_installed = False
#: The job process, whose death the children follow.
_job_pid = 0
#: This process's pid and main thread, as this process knows them (inherited, then updated in
#: the child): the child compares them with what it finds after fork, race-free.
_pid = 0
_main_ident = 0
_after_fork_callbacks: list[Callable[[], None]] = []
#: The lifeline's ends; -1 where this process does not hold that end.
_lifeline_read = -1
_lifeline_write = -1
_orphan_grace = 5.0


def set_death_signal(sig: int, parent_pid: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies (Linux only).

    If the parent is already gone by the time we ask (it died between fork and here), the request
    would never fire: deliver ``sig`` to ourselves at once instead. Raises OSError from prctl.
    """
    prctl(PR_SET_PDEATHSIG, int(sig))
    if parent_pid and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def _after_fork_in_child() -> None:
    global _pid, _main_ident, _lifeline_read, _lifeline_write
    parent_pid, parent_main = _pid, _main_ident
    forked_from_main_thread = threading.get_ident() == parent_main
    _pid, _main_ident = os.getpid(), threading.get_ident()  # this thread is the child's main thread
    for callback in _after_fork_callbacks:
        callback()
    if _lifeline_write >= 0:
        os.close(_lifeline_write)  # only the job process may hold it, or the pipe never reads as closed
        _lifeline_write = -1
    if parent_pid == _job_pid:
        if _lifeline_read >= 0:
            threads.start_daemon("safe-orphan-wd", _exit_when_orphaned, _lifeline_read)
        # The job process's SIGTERM handler is inherited by fork but meant for it alone: Airflow's
        # ``_exit_gracefully`` does nothing outside the parent, so an executor worker would ignore
        # SIGTERM, its death signal included. Give the child the default disposition it would have
        # had if spawned; the task processes it starts install their own handlers.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elif _lifeline_read >= 0:
        os.close(_lifeline_read)  # a grandchild: its parent watches the lifeline for it
        _lifeline_read = -1
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process. A child forked by
    # a short-lived helper thread would be killed when that thread ends, so only children forked by
    # a main thread are tied to their parent by the kernel.
    if forked_from_main_thread:
        try:
            set_death_signal(DEFAULT_DEATH_SIGNAL, parent_pid)
        except OSError as exc:
            log.warning("pid %d gets no death signal (prctl: %s): it may outlive pid %d",
                        _pid, exc.strerror or exc, parent_pid)


def install(orphan_grace: float = 5.0) -> None:
    """Make every process forked from now on (and, inherited, from its children) die with its parent.

    ``orphan_grace``: how long a child whose job process is gone waits for its own graceful
    shutdown (a task's ``on_kill``) before it kills its process tree and exits.
    """
    global _installed, _job_pid, _pid, _main_ident, _lifeline_read, _lifeline_write, _orphan_grace
    if _installed or not hasattr(os, "register_at_fork"):
        return
    try:
        death_signal()  # the same system call the children make: find out now if it fails
    except OSError as exc:
        log.warning("Children will get no death signal (prctl: %s): a SIGKILLed process leaves them", exc)
    _job_pid = _pid = os.getpid()
    _main_ident = threading.main_thread().ident or 0
    _orphan_grace = orphan_grace
    _lifeline_read, _lifeline_write = os.pipe()
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _installed = True


def run_after_fork_in_child(callback: Callable[[], None]) -> None:
    """Register ``callback`` to run first thing in every forked child (needs ``install``)."""
    _after_fork_callbacks.append(callback)


def _exit_when_orphaned(read_end: int) -> None:
    """In a direct child: block until the job process is gone, then make sure this child follows."""
    try:
        while os.read(read_end, 1):  # nobody ever writes: this returns b"" once the job process is gone
            pass
    except OSError:
        return
    # Logging here may never return (this child's main thread can hold its lock), so it runs beside.
    output.in_background(
        log.warning, "Job process (pid %d) is gone; pid %d exits within %gs, its own shutdown first",
        _job_pid, os.getpid(), _orphan_grace,
    )
    time.sleep(_orphan_grace)
    killed = tree.kill_all_below_us()
    output.bounded(
        output.SAY_GRACE, log.warning,
        "Killed %d process(es) below pid %d, which outlived the job process", killed, os.getpid(),
    )
    os._exit(exitcodes.FAILED)

"""Every process below the job dies with it, however it was started and whoever else died with it.

Two ties, because neither is enough alone:

* The *death signal*: a child gets ``PR_SET_PDEATHSIG`` (SIGTERM, so that a task can still run
  ``on_kill``), and the kernel sends it when the child's parent dies. Each process gets it from
  its own parent, so killing any ancestor takes the whole line below it.
* The *lifeline*: a death signal can be caught, and Airflow catches it (a worker that supervises a
  task forwards SIGTERM and carries on). So every process that stands directly below the job (or
  below the forkserver that forks for it) also holds the read end of a pipe whose write end only
  the job keeps open. It reads as end-of-file the moment the job is gone, however it died; the
  child then allows ``child_stop_timeout`` for its own graceful stop and kills its tree and itself.

Both are set up in the new process by the same object, ``Lineage``, whichever way it started:

* by ``os.fork`` (the ``fork`` start method, Airflow's own forks): an at-fork hook, inherited by
  every fork below;
* by exec (the ``spawn`` start method, and the ``forkserver`` itself): multiprocessing starts every
  such interpreter through ``multiprocessing.util.spawnv_passfds``; ours puts one ``arm(...)`` call
  in front of the child's ``-c`` program and passes the lifeline to it. In the forkserver, ``arm``
  installs the at-fork hook, so every worker it forks carries both ties too.

Why these and not the alternatives (the README's "kills" table shows what each leaves):

* A wrapper executable that calls ``prctl`` before ``exec`` (``setpriv --pdeathsig``) sets only
  the death signal, not the lifeline, and cannot tell whether a main thread started the child.
* A cgroup of our own needs a delegated cgroup tree, which neither supervisord nor a shell gives,
  and something alive to kill it: with the parent and the job both gone there is nobody.
* A pidfd each child polls needs Python 3.9 (2.6.3 runs on 3.7) and code in the child anyway,
  which is what ``arm`` is; the lifeline needs no polling.

A plain ``subprocess`` (an operator's ``Popen``) runs no code of ours: it is stopped by the job on
every way out it lives through, and by the parent (``reaper``) once the job is gone; only a kill of
both at once leaves it to the cgroup (systemd's ``KillMode=control-group``, the pod's container).

``PR_SET_PDEATHSIG`` fires when the *thread* that forked dies, not the process, so only children
started by a main thread get it; the lifeline ties the others. Every decision is made from state
the child owns (its parent's pid and main thread, copied at fork), never from what a before-fork
hook wrote: CPython may release the GIL between those hooks and ``fork()``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from safe_scheduler.base import exitcodes
from safe_scheduler.base import output
from safe_scheduler.base import threads
from safe_scheduler.children import tree
from safe_scheduler.base.prctl import death_signal, set_death_signal

log = logging.getLogger("safe_scheduler.children.forkhook")

#: Signal the kernel sends a child when its parent dies: SIGTERM lets tasks clean up.
DEFAULT_DEATH_SIGNAL = signal.SIGTERM
#: Seconds between two looks at an orphaned process's tasks and main thread.
POLL = 0.1
#: Where a worker's main thread waits for its next task, and how deep in its stack to look.
IDLE_IN = ("/multiprocessing/", "/billiard/")
IDLE_DEPTH = 8
#: The ``-c`` programs of the interpreters multiprocessing starts by exec that we arm: a spawned
#: process and the forkserver. The resource tracker is left alone: it outlives the others on
#: purpose, to clean up after them, and ends once the last of them is gone.
ARMED_PROGRAMS = ("from multiprocessing.spawn import", "from multiprocessing.forkserver import")
#: What goes in front of an armed ``-c`` program. Without our package (an interpreter of another
#: environment) the child starts as it would have.
ARMING = (
    "try:\n"
    "    from safe_scheduler.children.forkhook import arm\n"
    "except ImportError:\n"
    "    pass\n"
    "else:\n"
    "    arm({job_pid}, {parent_pid}, {child_stop_timeout!r}, {lifeline}, {death_signal}, {forkserver},"
    " {orphaned!r}, {cleanup!r})\n"
)


class Lineage:
    """This process's place below the job: who the job is, who its parent is, and its ties.

    One per process. The job makes it (``install``); a fork copies it, and its at-fork hook brings
    the copy up to date; a process started by exec makes its own (``arm``).
    """

    def __init__(self, job_pid: int, child_stop_timeout: float, lifeline_read: int = -1,
                 lifeline_write: int = -1, holder_pid: int | None = None, orphaned_task_timeout: float = 0.0,
                 task_cleanup_timeout: float = 0.0) -> None:
        #: The job process, whose end every process below it follows.
        self.job_pid = job_pid
        #: Seconds a process whose lifeline broke gives its main thread to report a task's end.
        self.child_stop_timeout = child_stop_timeout
        #: Seconds a task below a process whose lifeline broke may go on, and then its cleanup time.
        self.orphaned_task_timeout = orphaned_task_timeout
        self.task_cleanup_timeout = task_cleanup_timeout
        #: The lifeline's ends in this process; -1 where it does not hold that end.
        self.lifeline_read = lifeline_read
        self.lifeline_write = lifeline_write
        #: The process whose children watch the lifeline: the job, or a forkserver that forks for it.
        self.holder_pid = os.getpid() if holder_pid is None else holder_pid
        #: This process and its main thread, as it knows them: a child compares them after fork.
        self.pid = os.getpid()
        self.main_ident = threading.main_thread().ident or 0

    # -- the job's side ------------------------------------------------------------------------------

    def hook(self) -> None:
        """Tie every process forked or started by exec from now on (here and below) to its parent."""
        os.register_at_fork(after_in_child=self.after_fork_in_child)
        import multiprocessing.util

        original = multiprocessing.util.spawnv_passfds
        lineage = self

        def spawnv_passfds(path: Any, args: Any, passfds: Any) -> int:
            args, passfds = lineage.armed(list(args), list(passfds))
            return original(path, args, passfds)

        multiprocessing.util.spawnv_passfds = spawnv_passfds

    def armed(self, args: list[str], passfds: list[int]) -> tuple[list[str], list[int]]:
        """``args`` with ``arm(...)`` in front of a spawned process's or the forkserver's program,
        and the fds to pass with the lifeline added (for a child of the job)."""
        try:
            at = args.index("-c") + 1
        except ValueError:
            return args, passfds
        if at >= len(args) or not args[at].startswith(ARMED_PROGRAMS):
            return args, passfds
        lifeline = self.lifeline_read if os.getpid() == self.job_pid else -1
        args[at] = ARMING.format(
            job_pid=self.job_pid, parent_pid=os.getpid(), child_stop_timeout=self.child_stop_timeout,
            lifeline=lifeline, orphaned=self.orphaned_task_timeout, cleanup=self.task_cleanup_timeout, forkserver=args[at].startswith(ARMED_PROGRAMS[1]),
            # Only a main thread's child may get a death signal (see the module's docstring).
            death_signal=threading.current_thread() is threading.main_thread(),
        ) + args[at]
        return args, passfds + ([lifeline] if lifeline >= 0 else [])

    # -- the child's side ----------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        parent_pid, parent_main = self.pid, self.main_ident
        forked_from_main_thread = threading.get_ident() == parent_main
        self.pid, self.main_ident = os.getpid(), threading.get_ident()  # this thread is our main thread
        if self.lifeline_write >= 0:
            os.close(self.lifeline_write)  # only the job may hold it, or the pipe never reads as closed
            self.lifeline_write = -1
        watcher = parent_pid == self.holder_pid and self.lifeline_read >= 0
        if watcher:
            if parent_pid == self.job_pid:
                # The job's SIGTERM handler is inherited by fork but meant for it alone: Airflow's
                # ``_exit_gracefully`` does nothing outside the job, so an executor worker would
                # ignore SIGTERM, its death signal included. Give it the default it would have had
                # if spawned; the task processes it starts install their own handlers.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.watch_lifeline()
        elif self.lifeline_read >= 0:
            os.close(self.lifeline_read)  # deeper down: its parent watches the lifeline for it
            self.lifeline_read = -1
        if forked_from_main_thread and not watcher:
            # A lifeline's watcher gets no death signal: it may run a task, which goes on after an
            # unplanned end (``_exit_when_orphaned``), and the death signal would stop it.
            self.follow(parent_pid)

    def follow(self, parent_pid: int) -> None:
        """Get the death signal from ``parent_pid``, or at once if it is already gone."""
        try:
            set_death_signal(DEFAULT_DEATH_SIGNAL, parent_pid)
        except OSError as exc:
            log.warning("pid %d gets no death signal (prctl: %s): it may outlive pid %d",
                        os.getpid(), exc.strerror or exc, parent_pid)

    def watch_lifeline(self) -> None:
        if self.lifeline_read >= 0:
            threads.start_daemon("safe-orphan-wd", self._exit_when_orphaned)

    def lifeline_name(self) -> str:
        """The lifeline as ``/proc/<pid>/fd`` shows it, by which the tiny parent knows its holders."""
        return f"pipe:[{os.fstat(self.lifeline_read).st_ino}]" if self.lifeline_read >= 0 else ""

    def _exit_when_orphaned(self) -> None:
        """Block until the job is gone, then follow it: at once if this process runs no task; else
        once its tasks have finished and reported their own state, within ``orphaned_task_timeout``
        (past it they are stopped, with their cleanup time), and once its main thread is idle."""
        try:
            while os.read(self.lifeline_read, 1):  # nobody writes: b"" once the job is gone
                pass
        except OSError:
            return
        tasks = [p for p in tree.descendants(recursive=False) if tree.alive(p)]
        if tasks:
            # Logging here may never return (this process's main thread can hold its lock): beside.
            output.in_background(
                log.warning, "Job process (pid %d) is gone; pid %d lets its %d task(s) finish, up to %gs, then "
                "stops them", self.job_pid, os.getpid(), len(tasks), self.orphaned_task_timeout,
            )
            deadline = time.monotonic() + self.orphaned_task_timeout
            while any(tree.alive(p) for p in tasks) and time.monotonic() < deadline:
                time.sleep(POLL)
            left = [p for p in tasks if tree.alive(p)]
            if left:  # bounded: the stop logs, and the main thread may hold logging's lock for good
                output.bounded(self.task_cleanup_timeout + tree.KILL_WAIT + output.SAY_GRACE, tree.stop, left,
                               self.task_cleanup_timeout, None, "tasks past orphaned_task_timeout")
            _wait_idle(self.main_ident, self.child_stop_timeout)
        killed = tree.kill_all_below_us()
        if killed:
            output.bounded(output.SAY_GRACE, log.warning,
                           "Killed %d process(es) below pid %d, which outlived the job process", killed, os.getpid())
        os._exit(exitcodes.FAILED)  # a child of the job, which is gone: its code is read by nobody


def _wait_idle(main_ident: int, seconds: float) -> None:
    """Wait, up to ``seconds``, until the main thread waits for work (blocked in multiprocessing's
    or billiard's pipes): a worker's task has ended and the worker has reported its end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame, depth = sys._current_frames().get(main_ident), 0
        while frame is not None and depth < IDLE_DEPTH:
            if any(part in frame.f_code.co_filename for part in IDLE_IN):
                return
            frame, depth = frame.f_back, depth + 1
        time.sleep(POLL)


def install(child_stop_timeout: float, orphaned_task_timeout: float = 0.0, task_cleanup_timeout: float = 0.0) -> Lineage:
    """In the job: tie every process started below it from now on to the job, and to its parent."""
    try:
        death_signal()  # the same system call the children make: find out now if it fails
    except OSError as exc:
        log.warning("Children will get no death signal (prctl: %s): a SIGKILLed process leaves them", exc)
    read_end, write_end = os.pipe()
    lineage = Lineage(os.getpid(), child_stop_timeout, read_end, write_end,
                      orphaned_task_timeout=orphaned_task_timeout, task_cleanup_timeout=task_cleanup_timeout)
    lineage.hook()
    return lineage


def arm(job_pid: int, parent_pid: int, child_stop_timeout: float, lifeline: int, death: bool,
        forkserver: bool, orphaned_task_timeout: float = 0.0, task_cleanup_timeout: float = 0.0) -> None:
    """First thing in an interpreter multiprocessing started by exec below the job (``ARMING``).

    A spawned process is tied like a forked one: the death signal (where a main thread started
    it), the lifeline (where the job did). The forkserver gets the death signal and passes both
    ties on to every process it forks; it watches no lifeline itself (a thread in a process that
    forks is a hazard, and it ends by itself once the job is gone: its ``alive`` pipe closes).
    """
    holder = os.getpid() if forkserver else job_pid
    lineage = Lineage(job_pid, child_stop_timeout, lifeline, -1, holder_pid=holder,
                      orphaned_task_timeout=orphaned_task_timeout, task_cleanup_timeout=task_cleanup_timeout)
    if death and (forkserver or lifeline < 0):  # a lifeline's watcher gets none (after_fork_in_child)
        lineage.follow(parent_pid)
    if not forkserver:
        lineage.watch_lifeline()  # passed only to the job's own children
    lineage.hook()

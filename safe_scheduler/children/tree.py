"""Stopping process trees: the one primitive every stop goes through.

``stop()`` signals every target, waits once, kills what is left together with everything below
it, reaps, and names whatever it could not kill and why. Every target is signalled before any is
waited for, so two children that ignore SIGTERM cost one grace period, not two; and the wait is cut
to the time the shutdown deadline leaves, so a stop never needs a budget of its own.

Trees are listed before anything is signalled: once a process is dead its children are
re-parented to init (or to a subreaper) and can no longer be found from here.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil


log = logging.getLogger("safe_scheduler.children.tree")

#: Seconds to wait for SIGKILLed processes to be gone before naming them as unkillable.
KILL_WAIT = 1.0


@dataclass
class Outcome:
    """What one ``stop()`` did: ended politely, killed, and could not kill (with the reason)."""

    stopped: list[psutil.Process] = field(default_factory=list)
    killed: list[psutil.Process] = field(default_factory=list)
    unkillable: list[tuple[psutil.Process, str]] = field(default_factory=list)


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has ended; only its exit status is left to collect)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int | None = None, recursive: bool = True) -> list[psutil.Process]:
    """Every living process below ``pid`` (default: this process); its children only if not ``recursive``."""
    try:
        return [p for p in psutil.Process(pid or os.getpid()).children(recursive=recursive) if alive(p)]
    except psutil.NoSuchProcess:
        return []


def _with_trees(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        for member in [proc, *descendants(proc.pid)]:
            found.setdefault(member.pid, member)
    return list(found.values())


def send(procs: Iterable[psutil.Process], sig: int, refused: dict[int, str]) -> None:
    """Send ``sig`` to each process; note in ``refused`` why one we may not signal was skipped."""
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            refused[proc.pid] = _why_denied(proc)


def _why_denied(proc: psutil.Process) -> str:
    try:
        uid = proc.uids().real
    except psutil.Error:
        return "permission denied"
    return f"permission denied (it runs as uid {uid}, we as uid {os.geteuid()})"


def _why_alive(proc: psutil.Process) -> str:
    try:
        state = proc.status()
    except psutil.Error:
        state = "?"
    if state == psutil.STATUS_DISK_SLEEP:
        return "still alive after SIGKILL: in uninterruptible sleep (state D), waiting on the kernel"
    return f"still alive {KILL_WAIT:g}s after SIGKILL (state {state})"


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until ``procs`` have ended (zombies count as ended); return those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def reap() -> None:
    """Collect the exit status of the children multiprocessing started, through multiprocessing.

    Only through it: a child taken from multiprocessing with ``waitpid`` leaves its ``join()``
    without an exit code, and one taken from ``subprocess`` reads as exit code 0. Any other ended
    child of ours stays a zombie until we exit, which costs a process-table slot, not a process;
    ``alive()`` counts it as ended.
    """
    multiprocessing.active_children()


def stop(
    targets: Iterable[psutil.Process],
    grace: float,
    room: Callable[[], float] | None = None,
    what: str = "processes",
) -> Outcome:
    """SIGTERM ``targets`` → wait once, up to ``grace`` → SIGKILL what is left, trees included → reap.

    ``room``: the longest the polite wait may take now (what the shutdown deadline leaves less the
    kill's own time, ``TimePlan.polite_room``); the caller's plan, not this primitive, knows it.
    Processes we may not signal (another user's) and processes
    that outlive SIGKILL are logged by pid with the reason, and counted in the outcome (the caller
    counts the killed ones in its metrics).
    """
    targets = [p for p in targets if alive(p)]
    outcome = Outcome()
    if not targets:
        return outcome
    tree = _with_trees(targets)
    refused: dict[int, str] = {}
    send(targets, signal.SIGTERM, refused)
    wait = grace if room is None else max(0.0, min(grace, room()))
    left = _wait_gone(tree, wait)
    outcome.stopped = [p for p in tree if p not in left]
    if left:
        left = _with_trees(left)  # a process may have forked while we waited
        if grace == 0:  # the caller's wait is over already (tasks past their cleanup time)
            why = "still running"
        elif wait < grace:
            why = f"did not stop within {wait:.1f}s of SIGTERM (what the shutdown deadline left of {grace:g}s)"
        else:
            why = f"did not stop within {wait:.1f}s of SIGTERM"
        log.warning("%s %s; killing: %s", what, why, ", ".join(_describe(p) for p in left))
        send(left, signal.SIGKILL, refused)
        survivors = _wait_gone(left, KILL_WAIT)
        outcome.killed = [p for p in left if p not in survivors]
        outcome.unkillable = [(p, refused.get(p.pid) or _why_alive(p)) for p in survivors]
    reap()
    for proc, why in outcome.unkillable:
        log.error("Could not stop %s: %s", _describe(proc), why)
    return outcome


def let_resource_tracker_end() -> None:
    """Close this process's end of the pipe to multiprocessing's resource tracker (started under
    forkserver and spawn), before the final sweep.

    The tracker ignores SIGTERM and SIGINT by design, and ends only once every end of its pipe is
    closed, after unlinking what was leaked. With our end open, the sweep waited its whole grace
    for it, then SIGKILLed it, skipping that clean-up. With it closed, the tracker ends by itself
    once the sweep's SIGTERM has ended the other holders (the forkserver, spawned children). Our
    end is never needed again: the job is over.

    Our own semaphores are cleaned up first, as at exit (unlinked, which leaves them working for
    whoever holds one, and unregistered): else the tracker would find them leaked and unlink them,
    and our exit's clean-up would print a traceback for each. Never blocks on the tracker's lock: if
    another thread holds it, the sweep's kill remains.

    This reaches into multiprocessing's private parts, so it must never cost the sweep itself: if
    they are not as expected (another Python), the sweep goes on as it did without this.
    """
    try:
        _close_tracker_pipe()
    except Exception as exc:  # noqa: BLE001 - the sweep's kill of the tracker remains
        log.warning("Could not let multiprocessing's resource tracker end by itself (%r); the sweep "
                    "stops it", exc)


def _close_tracker_pipe() -> None:
    from multiprocessing import synchronize, util

    try:
        from multiprocessing.resource_tracker import _resource_tracker as tracker
    except ImportError:  # Python 3.7: the same tracker, for semaphores only, under its older name
        from multiprocessing.semaphore_tracker import _semaphore_tracker as tracker
    if tracker._fd is None:
        return  # never started (fork), or not ours to close
    for finalizer in list(util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup:
            try:
                finalizer()  # runs once: our exit will not run it again
            except Exception:  # noqa: BLE001 - already unlinked elsewhere; the tracker copes
                pass
    if not tracker._lock.acquire(blocking=False):
        return
    try:
        if tracker._fd is not None:
            with contextlib.suppress(OSError):  # closed already: the same for the tracker
                os.close(tracker._fd)
            tracker._fd = None
    finally:
        tracker._lock.release()


def kill_all_below_us() -> int:
    """SIGKILL everything below this process at once, for a forced exit that has no time left."""
    procs = descendants()
    send(procs, signal.SIGKILL, {})
    return len(procs)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({proc.name()})"
    except psutil.Error:
        return f"pid {proc.pid}"

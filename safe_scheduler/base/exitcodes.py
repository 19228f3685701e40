"""Every exit code of the safe commands, and which way out gets which: the one table.

Supervisors (supervisord, systemd, Kubernetes) decide what to do from the exit status alone, so
each outcome has its own number and the numbers never change meaning.

| way out                                        | noticed by                  | code                |
| ---------------------------------------------- | --------------------------- | ------------------- |
| the job returned (``--num-runs``)              | main thread                 | 0 ``OK``            |
| the job raised (the database went away, a bug) | main thread                 | 1 ``FAILED``        |
| the job raised ``SystemExit(n)``               | main thread                 | n                   |
| SIGTERM / SIGINT (also while waiting at start) | signal listener             | 0 ``OK``            |
| the parent died (``kill -9`` of the PID you    | the death signal            | 1 ``FAILED``        |
| started): tasks finish, then the stop          |                             |                     |
| no heartbeat for ``stall_timeout``             | stall watchdog              | 4 ``STALLED``       |
| any of these past the deadline                 | exit watchdog thread        | 3 ``FORCED`` (4 for |
|                                                |                             | a stall)            |
| the GIL held past the deadline + 5 s           | faulthandler's C thread     | 1 (CPython's)       |
| faulthandler blocked too (+ 3 s)               | the kernel (``alarm``)      | killed by SIGALRM   |
| bad input before start                         | ``startup``                 | 2 ``USAGE``         |
| the job process killed (the parent's view)     | the tiny parent             | 128 + the signal    |
| a child whose job is gone, after its grace     | its lifeline                | 1, read by nobody   |
| ``doctor``: nothing to do / a zombie path is   | ``doctor``                  | 0 / 1 / 2           |
| there / bad usage                              |                             |                     |

A cause beats what happens while unwinding from it: SIGTERM is a clean stop (0) even if the
database connection breaks on the way out, and a stall stays a stall (4) whatever the job raises
once Airflow's handler interrupts it. This module imports only the standard library: the tiny
parent uses it too.
"""

from __future__ import annotations

import enum
import os

OK = 0
FAILED = 1
USAGE = 2
FORCED = 3
STALLED = 4
#: CPython's faulthandler ends a process whose shutdown hangs while holding the GIL with this code;
#: it cannot be changed, so it shares the number with FAILED. The stack dump on stderr tells them apart.
FORCED_GIL_HELD = 1


class Cause(enum.Enum):
    """Why a job process stops, in the words the log uses."""

    RUN_ENDED = "the job ended"
    SIGNAL = "a signal"
    STALLED = "no heartbeat"
    #: The tiny parent above the job died (killed, OOM): a stop nobody planned.
    ORPHANED = "the parent is gone"


def of_run(exc: BaseException | None) -> int:
    """The code the job's own way out asks for: 0 for a return, else from the exception.

    A second exception raised while handling the first (SIGTERM's SystemExit(0) during the cleanup
    of a database error, or the reverse) does not change what ended the run: the first one decides.
    """
    if exc is None:
        return OK
    chain = [exc]
    while chain[-1].__context__ is not None and chain[-1].__context__ not in chain:
        chain.append(chain[-1].__context__)
    root = chain[-1]
    if isinstance(root, SystemExit):
        if root.code is None or isinstance(root.code, int):
            return root.code or OK
        return FAILED
    if isinstance(root, KeyboardInterrupt):
        return OK
    return FAILED


def of_stop(cause: Cause | None, run_code: int | None, forced: bool = False) -> int:
    """The code of a job process's stop, from its first cause and how the stop went."""
    if cause is Cause.STALLED:
        return STALLED
    if forced:
        return FORCED
    if cause is Cause.SIGNAL:
        return OK
    if cause is Cause.ORPHANED:
        return FAILED
    return FAILED if run_code is None else run_code


def of_status(status: int) -> int:
    """The tiny parent's code for its job's wait status: the job's own, or 128 + its signal."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

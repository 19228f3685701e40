"""Our helper threads, named in the kernel too.

CPython 3.11 leaves every thread's kernel name (``/proc/<pid>/task/<tid>/comm``) as the process
name, so ``top -H``, ``ps -L`` and a CPU profile cannot tell our watchdogs from Airflow's threads.
Each of ours sets its kernel name to the ``safe-…`` name it has in Python, which is what lets an
operator, and ``bench/run.py``, see what our threads cost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from safe_scheduler.base.prctl import PR_SET_NAME, prctl

#: The kernel keeps 15 bytes of a thread name.
KERNEL_NAME_MAX = 15


def set_kernel_name(name: str) -> bool:
    """Name the calling thread in the kernel (Linux only; the name is cut to 15 bytes).

    Cosmetic: a failure only costs the name in ``top -H``, so it is reported by the return value.
    """
    try:
        prctl(PR_SET_NAME, name.encode()[:KERNEL_NAME_MAX])
    except OSError:
        return False
    return True


def start_daemon(name: str, target: Callable[..., Any], *args: Any) -> threading.Thread:
    """Start a daemon thread called ``name`` in Python and in the kernel.

    Daemon, because none of our threads may ever be the reason the interpreter waits at exit.
    Raises RuntimeError from Python 3.12 on once the interpreter is finalizing (an atexit handler
    is running): ``threading`` then refuses new threads.
    """

    def run() -> None:
        set_kernel_name(name)
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def run_bounded(name: str, seconds: float, target: Callable[..., Any], *args: Any) -> bool:
    """Run ``target`` in a daemon thread and wait at most ``seconds`` for it; True if it finished.

    For logging on the way out: a log call takes locks that another thread may never release (a
    signal handler that raised between logging's acquire and release), and no exit may wait on them.
    """
    thread = start_daemon(name, target, *args)
    thread.join(seconds)
    return not thread.is_alive()

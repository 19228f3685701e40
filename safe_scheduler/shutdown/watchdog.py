"""Past the deadline: the forced exit, and the two backstops behind it.

The forced exit is a Python thread, so it needs the GIL; it kills the process tree first and then
reports, each report bounded, because logging takes locks another thread may hold forever (a
SIGTERM handler that raised between logging's acquire and release, seen on Airflow 2.11) and
stderr may be a pipe nobody reads.

Behind it, for a hang that holds the GIL (C code that never returns), ``faulthandler``'s timer, a
C thread that needs no GIL, dumps every stack and exits with code 1 (CPython's choice). It writes
to a non-blocking open of stderr (``output.nonblocking_stderr``), so a full pipe does not stop it.
Behind that, for the one output faulthandler could still block on (a socket nobody reads), the
kernel: ``alarm()`` with SIGALRM at its default disposition ends the process and writes nothing.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import signal
import sys
import threading
import traceback
from typing import NoReturn

from safe_scheduler.base import output
from safe_scheduler.children import tree
from safe_scheduler.base.metrics import Metrics

log = logging.getLogger("safe_scheduler.shutdown.watchdog")

#: Seconds after the deadline at which faulthandler's GIL-free timer ends the process.
BACKSTOP_MARGIN = 5.0
#: Seconds after that at which the kernel's SIGALRM ends it, if faulthandler's write blocked.
ALARM_MARGIN = 3.0
#: Seconds the forced exit waits for logging to report it before writing to stderr itself
#: (well within BACKSTOP_MARGIN, or faulthandler would end the process first, with code 1).
REPORT_GRACE = 2.0


def format_all_stacks() -> str:
    """Every thread's stack, named, as one block of text (sys._current_frames needs the GIL)."""
    names = {t.ident: f"{t.name}{' (daemon)' if t.daemon else ''}" for t in threading.enumerate()}
    blocks = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        blocks.append(f'Thread "{names.get(ident, "?")}" ({ident}):\n{stack}')
    return "\n".join(blocks)


class Backstops:
    """The two GIL-free ends behind the forced exit; armed once, when the shutdown starts."""

    def __init__(self) -> None:
        #: faulthandler keeps writing to this descriptor until the process ends: opened once.
        self._dump_fd = -1

    def arm(self, seconds: float) -> None:
        """End the process ``seconds`` + margins from now even if no Python code can run any more."""
        if self._dump_fd < 0:
            self._dump_fd = output.nonblocking_stderr()
        faulthandler.dump_traceback_later(seconds + BACKSTOP_MARGIN, exit=True, file=self._dump_fd)
        if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):
            # Only where nobody handles SIGALRM: a Python handler would need the GIL we may not get.
            signal.alarm(math.ceil(seconds + BACKSTOP_MARGIN + ALARM_MARGIN))


def force_exit(code: int, why: str, kind: str, metrics: Metrics) -> NoReturn:
    """Kill the process tree, say why, dump every stack, exit with ``code`` now. Never returns."""
    try:
        killed = tree.kill_all_below_us()
        if not output.bounded(REPORT_GRACE, _report, code, why, kind, killed, metrics):
            # Logging is blocked, or no thread can start (Python 3.12+ inside an atexit handler).
            # Not faulthandler.dump_traceback: it writes holding the GIL, and a blocked write there
            # would stop every thread, this one included. ``say`` never waits past its bound.
            output.say(f"safe_scheduler: Forcing exit with code {code}: {why}; killed {killed} processes; "
                       f"the log could not be written. Thread stacks at forced exit:\n{format_all_stacks()}\n")
    finally:
        os._exit(code)


def _report(code: int, why: str, kind: str, killed: int, metrics: Metrics) -> None:
    log.error("Forcing exit with code %d: %s; killed %d processes; thread stacks follow", code, why, killed)
    log.error("Thread stacks at forced exit:\n%s", format_all_stacks())
    metrics.incr(f"forced_exits.{kind}")
    metrics.incr("children_killed", killed)
    output.flush_handlers()

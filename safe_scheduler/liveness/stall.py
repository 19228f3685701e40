"""The stall watchdog: a scheduler that stops heartbeating is hung, not alive.

A frozen metadata database (a stopped server, a partition, a failover that leaves connections
dangling) leaves the scheduler's main thread waiting in the driver forever; it neither works nor
exits, and supervisors see a live process. We count successful job heartbeats, recorded by the
main thread itself (no ORM object is read from here), and when none has succeeded for
``stall_timeout`` seconds we dump the stacks and start the bounded shutdown. The watchdog wakes
only when the timeout can have passed (and each second where metrics are sent, for the gauge): a
beat is two clock reads in the main thread, and a worker beats every second.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from safe_scheduler.base import output
from safe_scheduler.base import threads
from safe_scheduler.base.metrics import Metrics
from safe_scheduler.shutdown.watchdog import format_all_stacks

log = logging.getLogger("safe_scheduler.liveness.stall")

#: Seconds between two ``seconds_since_heartbeat`` gauges, where metrics are on.
GAUGE_EVERY = 1.0
#: Seconds past the timeout at which it is looked at (a wait may end a little early).
LOOK_LATE = 0.05
#: A wake-up of the watchdog's own this much later than asked for, with almost no CPU used by the
#: process meanwhile, says the whole process was stopped (SIGSTOP, ``docker pause``, a debugger, a
#: VM frozen): not the job's fault. A job hung while the watchdog ran wakes it on time.
PAUSED_AFTER = 1.0
#: The share of a late wake-up that the process's CPU time may have grown by, for it to be a pause.
PAUSED_CPU = 0.1


def _cpu() -> float:
    """CPU seconds this process has used (user and system)."""
    times = os.times()
    return times.user + times.system


class StallWatchdog:
    """Tells ``on_stall`` once when heartbeats stop; what follows is the shutdown's business."""

    def __init__(self, stall_timeout: float, on_stall: Callable[[str], None], name: str = "job",
                 metrics: Metrics | None = None, progress: str = "successful heartbeat") -> None:
        self.stall_timeout = stall_timeout
        self.name = name
        #: What a beat stands for, in the log's words ("successful heartbeat").
        self.progress = progress
        self.metrics = metrics or Metrics()
        self.on_stall = on_stall
        #: Tried once when the timeout passes (the worker's reconnect); the stall is declared only if
        #: no beat comes within another ``stall_timeout``. Returns what it did, for the log.
        self.recover: Callable[[], str] | None = None
        self._recovering = False
        self._last_beat = time.monotonic()
        self._stop = threading.Event()

    def start(self) -> None:
        """Start counting now (the job's first heartbeat is due one heartbeat interval from here)."""
        if self.stall_timeout <= 0:
            return
        self._last_beat = time.monotonic()
        threads.start_daemon("safe-stall-wd", self._watch)

    def beat(self) -> None:
        self._last_beat = time.monotonic()
        self._recovering = False

    def stop(self, reason: str = "") -> None:
        """Shutdown has started: heartbeats are no longer expected."""
        self._stop.set()

    def seconds_since_heartbeat(self) -> float:
        return time.monotonic() - self._last_beat

    def _next_look(self) -> float:
        """Seconds until the timeout can have passed: nothing else wakes this thread, unless the
        gauge below is sent somewhere (then every ``GAUGE_EVERY``)."""
        until = max(0.0, self.stall_timeout - self.seconds_since_heartbeat()) + LOOK_LATE
        return min(until, GAUGE_EVERY) if self.metrics.on else until

    def _watch(self) -> None:
        while True:
            wait = self._next_look()
            due, cpu = time.monotonic() + wait, _cpu()
            if self._stop.wait(wait):
                return
            late = time.monotonic() - due
            if late > PAUSED_AFTER and _cpu() - cpu < PAUSED_CPU * late:
                self._paused(late)
                continue
            silent = self.seconds_since_heartbeat()
            if silent >= self.stall_timeout and self.recover is not None and not self._recovering:
                self._recover(silent)
            elif silent >= self.stall_timeout:
                self._stalled(silent)
                return
            self.metrics.gauge("seconds_since_heartbeat", silent)  # a no-op where metrics are off

    def _paused(self, late: float) -> None:
        """The whole process was stopped, this thread too: the job gets a fresh interval."""
        self._last_beat = time.monotonic()
        output.in_background(log.warning, "The process was paused for %.0fs (its own watchdog woke that late, "
                             "with no CPU used): the %s gets a fresh %gs", late, self.name, self.stall_timeout)

    def _recover(self, silent: float) -> None:
        """The first try: the clock starts again, and only a beat ends the recovery."""
        self._recovering = True
        self._last_beat = time.monotonic()
        self.metrics.incr("recoveries")
        try:
            done = self.recover()
        except Exception as exc:  # noqa: BLE001 - the stall follows if nothing comes of it
            done = f"failed: {type(exc).__name__}: {exc}"
        self._recovering = True  # a beat during recover() does not count: it may predate it
        output.in_background(
            log.warning, "No %s from the %s for %.0fs (stall_timeout %gs): %s; exiting (code 4) if none "
            "comes within another %gs", self.progress, self.name, silent, self.stall_timeout, done, self.stall_timeout,
        )

    def _stalled(self, silent: float) -> None:
        why = f"no {self.progress} from the {self.name} for {silent:.0f}s (stall_timeout {self.stall_timeout:g}s)"
        self.on_stall(why)  # the deadline first: logging can be what hangs (a lock left held, a full pipe)
        # If the main thread can still run Python, Airflow's own SIGTERM handler unwinds it
        # gracefully; if it is stuck in C (or in a write nobody reads), the deadline ends the process.
        os.kill(os.getpid(), signal.SIGTERM)
        self.metrics.incr("stalls")
        output.in_background(
            log.error, "%s is hung: %s; shutting down. Thread stacks:\n%s",
            self.name.capitalize(), why, format_all_stacks(),
        )

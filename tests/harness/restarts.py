"""Restart policies simulated around a real command, as a supervisor would run it: the kubelet's
CrashLoopBackOff, supervisord with ``examples/supervisord.conf``'s settings, systemd with the shipped
unit's. Each incarnation is a real process (``procs.SchedulerProcess``), killed by pid at cleanup."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from harness.procs import SchedulerProcess


class Kubelet:
    """``restartPolicy: Always``: the wait before a restart starts at 10 s and doubles up to 300 s; it
    starts over once a container's finish comes more than 600 s (twice the maximum) after the last."""

    FIRST, MAX = 10.0, 300.0

    def __init__(self) -> None:
        self.delay = 0.0
        self.last_finish: float | None = None

    def next_delay(self, ran: float, finished: float, code: int) -> float | None:
        if self.last_finish is None or finished - self.last_finish > 2 * self.MAX:
            self.delay = self.FIRST
        else:
            self.delay = min(self.MAX, self.delay * 2)
        self.last_finish = finished
        return self.delay


class Supervisord:
    """``autorestart=unexpected``, ``exitcodes=0``, ``startsecs=10``, ``startretries=1000``: an exit
    within ``startsecs`` is a failed start, tried again after 1, 2, 3 … s; an exit after it (the
    program was RUNNING) is restarted at once; exit 0 is not restarted."""

    STARTSECS = 10.0

    def __init__(self) -> None:
        self.failed_starts = 0

    def next_delay(self, ran: float, finished: float, code: int) -> float | None:
        if code == 0:
            return None
        if ran < self.STARTSECS:
            self.failed_starts += 1
            return float(self.failed_starts)
        self.failed_starts = 0
        return 0.0


class Systemd:
    """``Restart=on-failure``, ``RestartSec=5`` and systemd's default start limit (5 starts within
    10 s, then the unit fails for good): ``examples/airflow-safe-scheduler.service``."""

    RESTART_SEC, BURST, INTERVAL = 5.0, 5, 10.0

    def __init__(self) -> None:
        self.starts: list[float] = []

    def next_delay(self, ran: float, finished: float, code: int) -> float | None:
        if code == 0:
            return None
        self.starts = [t for t in self.starts if finished + self.RESTART_SEC - t < self.INTERVAL]
        if len(self.starts) >= self.BURST:
            return None
        self.starts.append(finished + self.RESTART_SEC)
        return self.RESTART_SEC


POLICIES = {"kubelet": Kubelet, "supervisord": Supervisord, "systemd": Systemd}


class Restarted:
    """``start()`` run, and run again after each exit as ``policy`` says, until ``stop``."""

    def __init__(self, start: Callable[[], SchedulerProcess], policy: Kubelet | Supervisord | Systemd) -> None:
        self.start = start
        self.policy = policy
        self._stop = threading.Event()
        #: Every incarnation, the first one started before this returns.
        self.runs: list[SchedulerProcess] = [start()]
        self._began = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            proc = self.runs[-1]
            while proc.popen.poll() is None:
                if self._stop.wait(0.05):
                    return
            finished = time.monotonic()
            delay = self.policy.next_delay(finished - self._began, finished, proc.popen.returncode)
            if delay is None or self._stop.wait(delay):
                return
            self._began = time.monotonic()
            self.runs.append(self.start())

    @property
    def current(self) -> SchedulerProcess:
        return self.runs[-1]

    def stop(self) -> None:
        """No more restarts (the incarnations are the deployment's to clean up, by pid)."""
        self._stop.set()
        self._thread.join(5)

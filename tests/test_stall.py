"""The stall watchdog on its own (no Airflow): it wakes only when the timeout can have passed, so
beats that keep coming must keep it quiet and a silence must end it, on time."""

from __future__ import annotations

import threading
import time

from harness.procs import wait_for
from safe_scheduler.base.metrics import Metrics
from safe_scheduler.liveness.stall import StallWatchdog


def _watchdog(timeout: float) -> tuple[StallWatchdog, list[float], list[float]]:
    stalls: list[float] = []
    recoveries: list[float] = []
    stall = StallWatchdog(timeout, on_stall=lambda why: stalls.append(time.monotonic()), metrics=Metrics(on=False))
    stall.recover = lambda: (recoveries.append(time.monotonic()), "reconnected")[1]
    return stall, stalls, recoveries


def _beat(stall: StallWatchdog, every: float, until: threading.Event) -> None:
    while not until.wait(every):
        stall.beat()


def test_beats_keep_it_quiet_and_a_silence_is_recovered_then_a_stall(monkeypatch):
    monkeypatch.setattr("os.kill", lambda pid, sig: None)  # the stall's SIGTERM to ourselves
    stall, stalls, recoveries = _watchdog(1.0)
    beating = threading.Event()
    beater = threading.Thread(target=_beat, args=(stall, 0.3, beating), daemon=True)
    started = time.monotonic()
    stall.start()
    beater.start()
    try:
        # Three timeouts' worth of beats: neither a recovery nor a stall.
        wait_for(lambda: time.monotonic() - started > 3.0 or recoveries or stalls, 5)
        assert not recoveries and not stalls
    finally:
        beating.set()
        beater.join()
    silent = time.monotonic()
    wait_for(lambda: stalls, 5, interval=0.05, message="the stall")
    # One recovery a timeout after the last beat, the stall a timeout later; each on time.
    assert len(recoveries) == 1 and 0.7 < recoveries[0] - silent < 1.5, recoveries[0] - silent
    assert 0.9 < stalls[0] - recoveries[0] < 1.5, stalls[0] - recoveries[0]
    stall.stop()

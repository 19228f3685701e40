"""A real scheduler whose stdout and stderr are a pipe nobody reads any more.

What a container log driver in blocking mode does when its endpoint is down, or a ``| tee`` whose
reader hung: every write blocks, the scheduler's main thread in a log line first. The pipe is
drained while the scheduler starts, then the reader stops and the pipe is filled through a second,
non-blocking open of it (the scheduler's own descriptor stays blocking, as it would be).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from harness.procs import fill_pipe, wait_for
from safe_scheduler.shutdown import watchdog

MARGIN = 10.0


class PipeReader:
    """Reads a pipe into memory until told to stop; the pipe then fills up."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.data = bytearray()
        self._reading = threading.Event()
        self._reading.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._reading.wait()
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                return
            self.data += chunk

    def stop_reading_and_fill(self) -> int:
        self._reading.clear()
        return fill_pipe(self.write_end, wake=True)  # the wake-up ends a read in progress

    def drain(self) -> bytes:
        """Once the writer is gone: everything that reached the pipe after it was full."""
        os.close(self.write_end)
        self._reading.set()
        self._thread.join(30)
        return bytes(self.data)


def _scheduler_on_a_full_pipe(deployment, *args: str):
    pipe = PipeReader()
    scheduler = deployment.scheduler(*args, output=pipe.write_end)
    scheduler.log = lambda: pipe.data.decode(errors="replace")  # what was read, for failure messages
    scheduler.wait_healthy()
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")
    pipe.stop_reading_and_fill()
    return scheduler, pipe


def test_db_stopped_with_output_nobody_reads(deployment, postgres):
    """The main thread blocks in a log write: no heartbeat, so a stall; the deadline ends it."""
    stall, shutdown = 20, 10
    scheduler, pipe = _scheduler_on_a_full_pipe(
        deployment, "--stall-timeout", str(stall), "--shutdown-timeout", str(shutdown)
    )
    postgres.stop("immediate")
    fault = time.monotonic()
    code = scheduler.wait_exit(stall + shutdown + watchdog.BACKSTOP_MARGIN + MARGIN)
    took = time.monotonic() - fault
    said = pipe.drain()
    print(f"DB stopped: exit code {code} after {took:.1f}s; {len(said)} bytes read in all")
    assert code is not None, f"still alive {took:.0f}s after the DB stopped, with its output blocked"
    assert code != 0
    assert took < stall + shutdown + watchdog.BACKSTOP_MARGIN + MARGIN
    left = scheduler.survivors_after(5)
    assert not left, f"outlived the scheduler: {[(p.pid, p.name()) for p in left]}"


def test_sigterm_with_output_nobody_reads(deployment):
    shutdown = 10
    scheduler, pipe = _scheduler_on_a_full_pipe(deployment, "--shutdown-timeout", str(shutdown))
    sent = scheduler.signal(signal.SIGTERM)
    code = scheduler.wait_exit(shutdown + watchdog.BACKSTOP_MARGIN + MARGIN)
    took = time.monotonic() - sent
    said = pipe.drain()
    print(f"SIGTERM: exit code {code} after {took:.1f}s; {len(said)} bytes read in all")
    assert code is not None, f"still alive {took:.0f}s after SIGTERM, with its output blocked"
    assert took < shutdown + watchdog.BACKSTOP_MARGIN + MARGIN
    left = scheduler.survivors_after(5)
    assert not left, f"outlived the scheduler: {[(p.pid, p.name()) for p in left]}"

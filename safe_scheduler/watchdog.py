"""The exit watchdog: once shutdown starts, the process is gone within ``shutdown_timeout``.

Shutdown starts when the scheduler's run ends (normally or by an exception) or when SIGTERM/SIGINT
arrives. From then on, whatever holds the process (a non-daemon thread, a blocking atexit handler,
``executor.end()`` waiting on a task, a child that ignores SIGTERM, a frozen database socket) has
until the deadline. Past it: one log line, every thread's stack, SIGKILL to the process tree,
``os._exit(FORCED)``.

The watchdog is a Python thread, so it needs the GIL. A C call that holds the GIL forever would
stop it too; ``faulthandler``'s timer is a C thread that needs no GIL, so it is armed a few seconds
later as the last resort (it dumps stacks to stderr and exits with code 1).

Signals are noticed through ``signal.set_wakeup_fd``: the C-level handler writes the signal number
to a socket without running any Python, so we learn of SIGTERM even while the main thread is stuck
in a C call, and Airflow's own handlers stay exactly as they are, installed by Airflow.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

from collections.abc import Callable

from safe_scheduler import children, exitcodes, metrics, threads

log = logging.getLogger("safe_scheduler.watchdog")

#: Seconds after the deadline at which the GIL-free last resort fires.
BACKSTOP_MARGIN = 5.0
#: Seconds the forced exit waits for logging to report it before writing to stderr itself
#: (well within BACKSTOP_MARGIN, or faulthandler would end the process first, with code 1).
REPORT_GRACE = 2.0

_SHUTDOWN_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def format_all_stacks() -> str:
    """Every thread's stack, named, as one block of text (sys._current_frames needs the GIL)."""
    names = {t.ident: f"{t.name}{' (daemon)' if t.daemon else ''}" for t in threading.enumerate()}
    blocks = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        blocks.append(f'Thread "{names.get(ident, "?")}" ({ident}):\n{stack}')
    return "\n".join(blocks)


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - flushing is best effort on the way out
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


class ExitWatchdog:
    """Arms a deadline the first time shutdown starts; past it, forces the exit."""

    def __init__(self, shutdown_timeout: float) -> None:
        self.shutdown_timeout = shutdown_timeout
        self.reason: str | None = None
        self.armed_at: float | None = None
        #: Exit code and metric name used if the deadline passes, set by whoever armed it.
        self.forced_code = exitcodes.FORCED
        self.forced_kind = "shutdown_deadline"
        #: Called with the reason once, when shutdown starts (systemd STOPPING=1, stall watchdog off).
        self.on_arm: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    # -- signals ---------------------------------------------------------------------------------

    def watch_signals(self) -> None:
        """Arm on SIGTERM/SIGINT without touching the handlers (call from the main thread)."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)
        children.run_after_fork_in_child(self._forget_in_child)
        threads.start_daemon("safe-signals", self._listen, reader)

    def _forget_in_child(self) -> None:
        # A forked child inherits the wakeup fd: its signals would arm *our* deadline. Cut it loose.
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None

    def _listen(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in _SHUTDOWN_SIGNALS:
                    self.arm(f"received {_SHUTDOWN_SIGNALS[signum]}")

    def hold_signals(self) -> None:
        """Once Airflow's job is over, let no further SIGTERM/SIGINT interrupt the bounded shutdown.

        Airflow's handlers raise SystemExit; raised in the middle of stopping a child, that would
        skip the kill step. From here on the deadline, not a second signal, bounds the shutdown.
        """
        if threading.current_thread() is threading.main_thread():
            for signum in _SHUTDOWN_SIGNALS:
                signal.signal(signum, self._during_shutdown)

    def _during_shutdown(self, signum: int, frame: object) -> None:
        log.info(
            "%s during shutdown: already stopping, forced exit in %.1fs at the latest",
            _SHUTDOWN_SIGNALS.get(signum, signum),
            self.remaining(),
        )

    # -- deadline --------------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return self.armed_at is not None

    def arm(self, reason: str, forced_code: int | None = None, forced_kind: str | None = None) -> None:
        """Start the shutdown deadline; later calls keep the first reason and deadline."""
        with self._lock:
            if self.armed_at is not None:
                return
            self.reason, self.armed_at = reason, time.monotonic()
            self.forced_code = forced_code if forced_code is not None else self.forced_code
            self.forced_kind = forced_kind or self.forced_kind
        # The deadline first, logging and hooks after: a signal handler that raised inside logging's
        # lock release leaves that lock held (seen on Airflow 2.11; test_watchdog reproduces it), and
        # then a log call from this thread blocks forever. force_exit does not depend on logging.
        faulthandler.dump_traceback_later(self.shutdown_timeout + BACKSTOP_MARGIN, exit=True)
        threads.start_daemon("safe-exit-wd", self._expire)
        for callback in self.on_arm:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - a hook must not stop the deadline from being armed
                log.exception("shutdown hook failed")
        log.info(
            "Shutdown started (%s); the process will be gone within %gs", reason, self.shutdown_timeout
        )

    def remaining(self) -> float:
        if self.armed_at is None:
            return self.shutdown_timeout
        return max(0.0, self.armed_at + self.shutdown_timeout - time.monotonic())

    def _expire(self) -> None:
        time.sleep(self.remaining())
        self.force_exit(f"shutdown did not finish within {self.shutdown_timeout:g}s ({self.reason})")

    def force_exit(self, why: str) -> None:
        """Kill the process tree, say why, dump every stack, exit now. Never returns.

        Logging takes locks that another thread may hold forever (a SIGTERM handler that raised
        between logging's acquire and release; a handler stuck writing to a full pipe), so the kill
        comes first and the report gets ``REPORT_GRACE`` seconds; past that it goes to fd 2, which
        takes no lock.
        """
        code = self.forced_code
        try:
            killed = children.kill_descendants()
            if not threads.run_bounded("safe-exit-log", REPORT_GRACE, self._report_forced_exit, code, why, killed):
                os.write(2, f"safe_scheduler: forcing exit with code {code}: {why} "
                            f"(logging is blocked); thread stacks follow\n".encode())
                faulthandler.dump_traceback(all_threads=True)
        finally:
            os._exit(code)

    def _report_forced_exit(self, code: int, why: str, killed: int) -> None:
        log.error("Forcing exit with code %d: %s; killed %d processes; thread stacks follow", code, why, killed)
        log.error("Thread stacks at forced exit:\n%s", format_all_stacks())
        metrics.incr(f"forced_exits.{self.forced_kind}")
        metrics.incr("children_killed", killed)
        flush_logs()

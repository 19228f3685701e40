"""Hearing SIGTERM and SIGINT without taking them from Airflow.

``signal.set_wakeup_fd``: CPython's C-level handler writes the signal number to a socket before any
Python runs, and a thread of ours reads it. So a signal is heard even while the main thread is
stuck in a C call (a database driver that retries on EINTR), and Airflow's own handlers stay
exactly as Airflow installed them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from safe_scheduler.base import output
from safe_scheduler.base import threads

log = logging.getLogger("safe_scheduler.shutdown.signals")

SHUTDOWN_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class SignalListener:
    """Calls ``on_signal(name)`` for every SIGTERM/SIGINT (and ``also``), from its own thread.

    ``also``: more signals by name ("SIGQUIT"), heard only while something in the process has a
    Python handler for them (Celery's worker has one for SIGQUIT).
    """

    def __init__(self, on_signal: Callable[[str], None], also: tuple[str, ...] = ()) -> None:
        self.on_signal = on_signal
        self.heard = dict(SHUTDOWN_SIGNALS)
        self.heard.update({getattr(signal, name): name for name in also})
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1

    def start(self) -> None:
        """Install the wakeup fd (from the main thread) and start listening."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        if self._previous_fd != -1:
            # Someone (an asyncio loop, a library) listens there too: keep it fed, do not steal it.
            log.info("Signal wakeup fd %d was in use; forwarding signal numbers to it", self._previous_fd)
        self._sockets = (reader, writer)
        os.register_at_fork(after_in_child=self._forget_in_child)
        threads.start_daemon("safe-signals", self._listen, reader)

    def stop(self) -> None:
        """Stop listening (from the main thread): the wakeup fd goes back to what it was."""
        self._forget_in_child()

    def _forget_in_child(self) -> None:
        # A forked child inherits the wakeup fd: its signals would start *our* shutdown.
        if self._sockets is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for sock in self._sockets:
                sock.close()
            self._sockets = None

    def _listen(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if self._previous_fd != -1:
                with contextlib.suppress(OSError):  # non-blocking: set_wakeup_fd accepts no other
                    os.write(self._previous_fd, data)
            for signum in data:
                if signum in self.heard:
                    self.on_signal(self.heard[signum])


def hold(remaining: Callable[[], float]) -> None:
    """Once Airflow's job is over, let no further SIGTERM/SIGINT interrupt the bounded shutdown.

    Airflow's handlers raise SystemExit; raised in the middle of stopping a child, that would skip
    the kill step. From here on the deadline, not a second signal, bounds the shutdown.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def during_shutdown(signum: int, frame: object) -> None:
        output.in_background(
            log.info, "%s during shutdown: already stopping, forced exit in %.1fs at the latest",
            SHUTDOWN_SIGNALS.get(signum, signum), remaining(),
        )

    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, during_shutdown)

"""sd_notify for ``Type=notify`` units, without a dependency: one datagram per message.

READY=1 once the scheduler has heartbeated, WATCHDOG=1 on successful heartbeats (at most twice per
``WatchdogSec``), STOPPING=1 when shutdown starts; while it waits for its database at start, a
status and an extension of the start timeout. With no ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("safe_scheduler.liveness.systemd")

#: Seconds each "still waiting" extends systemd's start timeout by; sent every poll (1 s).
WAITING_EXTENSION = 10.0


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None, parent_pid: int = 0) -> None:
        """``parent_pid``: our tiny parent's (``reaper``), 0 where the job runs without one."""
        env = os.environ if environ is None else environ
        self.parent_pid = parent_pid
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self.address = address
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._ready = False
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait on a receiver that stopped reading: this also runs on the way out.
                sock.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message, exc)

    def heartbeat(self) -> None:
        """A successful scheduler heartbeat: READY=1 the first time, then WATCHDOG=1."""
        if self.address is None:
            return
        if not self._ready:
            self._ready = True
            # Under our parent (``reaper``) the main PID stays the parent's: it outlives the job.
            mainpid = "" if self.parent_pid else f"MAINPID={os.getpid()}\n"
            self.send(f"READY=1\n{mainpid}STATUS=Heartbeating")
        now = time.monotonic()
        if self.watchdog_interval is not None and now - self._last_watchdog >= min(self.watchdog_interval, 1.0):
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def waiting(self, status: str) -> None:
        """Alive and waiting (for the metadata database), not ready: neither the start timeout nor
        the watchdog may end us for it (``EXTEND_TIMEOUT_USEC`` needs systemd 236 or newer)."""
        if self.address is None:
            return
        watchdog = "\nWATCHDOG=1" if self.watchdog_interval is not None else ""
        self.send(f"STATUS={status}\nEXTEND_TIMEOUT_USEC={int(WAITING_EXTENSION * 1e6)}{watchdog}")

    def stopping(self, reason: str) -> None:
        self.send(f"STOPPING=1\nSTATUS=Shutting down: {reason}")

"""Datagram listeners (statsd on UDP, sd_notify on a unix socket) that collect what they are sent."""

from __future__ import annotations

import re
import socket
import threading


class Listener:
    """Collects datagrams (statsd on UDP, sd_notify on a unix socket) in a background thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except (socket.timeout, OSError):
                continue
            self.messages.extend(data.decode(errors="replace").splitlines())

    def has(self, pattern: str) -> bool:
        return any(re.search(pattern, m) for m in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

"""The api-server's sign of life: each worker's own event loop turning.

uvicorn's tick calls ``config.callback_notify`` every ``timeout_notify`` seconds, from the worker's
event loop; ``beat`` is that hook (a spawned worker gets it pickled with its config, and imports
only this module for it). Each beat is one datagram with the worker's pid to a UDP port on
127.0.0.1, which ``Beats`` reads in a thread of the job. Progress is every live worker having beaten
since the last report: one blocked worker stops it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable

from safe_scheduler.base import threads
from safe_scheduler.children import tree

#: Seconds between two beats of a worker's event loop.
BEAT_EVERY = 1.0
#: Where a worker sends its beats: the job's UDP port on 127.0.0.1, inherited through the environment
#: (spawned workers get nothing else of the job's).
BEATS_ENV = "AIRFLOW_SAFE_API_SERVER_BEATS"

#: This worker's socket for its beats, made at its first beat.
_sender: list[socket.socket] = []


async def beat() -> None:
    """uvicorn's ``callback_notify``, run by each worker's own event loop: this loop turned."""
    port = os.environ.get(BEATS_ENV)
    if not port:
        return
    if not _sender:
        _sender.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        _sender[0].setblocking(False)
    with contextlib.suppress(OSError):  # the job gone or its buffer full: the next beat tries again
        _sender[0].sendto(str(os.getpid()).encode(), ("127.0.0.1", int(port)))


class Beats:
    """The workers' beats, heard from a thread of the job's: progress once every live worker has
    beaten since the last report."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(BEAT_EVERY)
        self.port: int = self.socket.getsockname()[1]
        self.last: dict[int, float] = {}
        self.on_turn: list[Callable[[], None]] = []
        self._reported = 0.0

    def start(self) -> None:
        threads.start_daemon("safe-loop-beats", self._listen)

    def stale(self, seconds: float) -> list[int]:
        """The workers whose loop has not turned for ``seconds``."""
        now = time.monotonic()
        return [pid for pid, at in list(self.last.items()) if now - at > seconds]

    def _listen(self) -> None:
        while True:
            try:
                pid = int(self.socket.recv(32))
            except (socket.timeout, ValueError):
                pid = 0
            except OSError:
                return
            now = time.monotonic()
            if pid:
                self.last[pid] = now
            self._forget_the_dead()
            if self.last and min(self.last.values()) > self._reported:
                self._reported = now
                for callback in self.on_turn:
                    callback()

    def _forget_the_dead(self) -> None:
        """A worker that ended (uvicorn starts another, with a pid of its own) is no longer waited
        for. Workers are the job's children, or the job itself with one worker."""
        live = {proc.pid for proc in tree.descendants(recursive=False)} | {os.getpid()}
        for pid in set(self.last) - live:
            self.last.pop(pid, None)

"""Output on the way out, which must never be what holds the process.

A write to a pipe whose reader stopped reading blocks until somebody reads: a container log driver
in blocking mode whose endpoint is down (Docker's fluentd, awslogs, gelf), a ``| tee`` that hung,
any full pipe. Measured before this module: a scheduler with such a stdout/stderr was still alive
75 s after the database went away, its forced exit stuck in ``os.write(2, …)`` and the
faulthandler backstop stuck writing its dump to the same pipe.

So on the exit path:

* a log call or a write runs in a daemon thread and is waited for a bounded time (``bounded``,
  ``say``); past that it is abandoned, and ``os._exit`` takes the thread with it;
* the GIL-free backstop writes its dump to ``nonblocking_stderr()``, a second open of the same pipe
  with ``O_NONBLOCK``: a full pipe makes the write fail at once instead of waiting.

What did not fit into the pipe before the exit is lost; what did fit is read once the reader
drains it. Our own descriptor 1 and 2 stay as they are (blocking), so nothing changes for Airflow.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from safe_scheduler.base import threads

#: Seconds a line on stderr may take on the way out before it is given up.
SAY_GRACE = 1.0


def bounded(seconds: float, func: Callable[..., Any], *args: Any) -> bool:
    """Run ``func(*args)`` beside us and wait at most ``seconds``; True if it finished.
    False, without running it, once no thread can start (Python 3.12+ while the interpreter
    is finalizing, e.g. inside an atexit handler)."""
    try:
        return threads.run_bounded("safe-exit-out", seconds, func, *args)
    except RuntimeError:
        return False


def in_background(func: Callable[..., Any], *args: Any) -> None:
    """Run ``func(*args)`` beside us and do not wait: for log lines the caller must not hang on.
    Once the interpreter is finalizing (Python 3.12+: no new thread) the line is dropped."""
    with contextlib.suppress(RuntimeError):
        threads.start_daemon("safe-exit-out", func, *args)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def say(text: str, seconds: float = SAY_GRACE) -> bool:
    """Write ``text`` to stderr (fd 2, no Python lock) within ``seconds``; True if it all went out.

    From Python 3.12 on no thread can start once the interpreter is finalizing, which is where a
    blocking atexit handler holds the exit (seen: a forced exit that said nothing at all). Then
    the text goes out through ``write_now`` instead: what stderr takes at once.
    """
    data = text.encode(errors="replace")
    try:
        return threads.run_bounded("safe-exit-out", seconds, _write_all, 2, data)
    except RuntimeError:
        return write_now(data)


def write_now(data: bytes) -> bool:
    """Write to stderr what it takes without waiting; True if all of ``data`` went out.

    Never blocks: a pipe or terminal through ``nonblocking_stderr``, a socket (journald) with
    ``MSG_DONTWAIT`` on a duplicate. A full pipe or socket loses the rest.
    """
    try:
        fd = nonblocking_stderr()
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                sock = socket.socket(fileno=fd)
                try:
                    while data:
                        data = data[sock.send(data, socket.MSG_DONTWAIT):]
                finally:
                    sock.detach()  # the descriptor is closed below, once
            else:
                _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError:  # BlockingIOError when full; anything else: stderr is gone
        return False
    return True


def flush_handlers() -> None:
    """Flush every root handler and the std streams; wait for queued records to be written.

    Airflow 2's triggerer logs through a ``QueueHandler``: its records are written later by a
    ``QueueListener`` thread, so an ``os._exit`` right after a log call would drop them (the
    forced-exit stack dump among them). An empty queue is not enough: the listener takes a record
    off the queue *before* it writes it, and a long record (a stack dump) is still being written
    then (seen in CI: the dump's header line out, the dump itself lost). So we wait until each
    listener is back in ``dequeue``, twice in a row. Call it bounded (``flush_logs``): a listener
    stuck in its handler would be waited for forever.
    """
    for handler in logging.getLogger().handlers:
        queue = getattr(handler, "queue", None) if isinstance(handler, logging.handlers.QueueHandler) else None
        while queue is not None and (getattr(queue, "unfinished_tasks", 0) or not queue.empty()):
            time.sleep(0.01)
    for thread, listener in _queue_listeners():
        idle_polls = 0
        while idle_polls < 2 and thread.is_alive():
            idle_polls = idle_polls + 1 if _waiting_for_a_record(thread, listener) else 0
            time.sleep(0.01)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _queue_listeners() -> list[tuple[threading.Thread, logging.handlers.QueueListener]]:
    """Every running ``logging.handlers.QueueListener``, with the thread of its ``_monitor`` loop."""
    found = []
    for thread in threading.enumerate():
        owner = getattr(getattr(thread, "_target", None), "__self__", None)
        if isinstance(owner, logging.handlers.QueueListener):
            found.append((thread, owner))
    return found


def _waiting_for_a_record(thread: threading.Thread, listener: logging.handlers.QueueListener) -> bool:
    """True while the listener waits in ``dequeue`` with its queue empty: nothing taken, unwritten."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None and frame.f_code.co_name != "dequeue":
        frame = frame.f_back
    return frame is not None and listener.queue.empty()


def flush_logs(seconds: float = SAY_GRACE) -> bool:
    """``flush_handlers`` for at most ``seconds`` in all."""
    return bounded(seconds, flush_handlers)


def nonblocking_stderr() -> int:
    """A descriptor for stderr that never blocks a writer, for the GIL-free backstop's dump.

    A pipe or a terminal is opened a second time through ``/proc/self/fd/2`` with ``O_NONBLOCK``:
    a new open file description, so fd 2 itself stays blocking for everyone else. A regular file
    never blocks a write for long, so it is shared as it is (a duplicate keeps its offset and
    ``O_APPEND``). A socket cannot be opened a second time; its duplicate can still block, which
    is why the backstop has a last layer that writes nothing (``watchdog``).
    """
    try:
        mode = os.fstat(2).st_mode
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        with contextlib.suppress(OSError):
            return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.dup(2)

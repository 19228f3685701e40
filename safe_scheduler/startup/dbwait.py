"""Waiting at start for a metadata database (or a Celery broker) that does not answer, alive and saying so.

Exiting on a lost database is right, and the job does (exit 1). What comes after decides how long
users wait once the database is back. Every exit is a restart: the kubelet's back-off grows from
10 s to 300 s and forgets only after 10 minutes, supervisord's by a second per try, and systemd's
start limit can give up for good. So after an outage of a few minutes every pod sits in back-off,
and comes back anywhere from 0 to 300 s after the database does.

So a process that finds its database unreachable at start (refused, timed out, a name that does not
resolve, a server starting up: ``DatabaseUnreachable``, as ``preflight`` tells them apart) waits for
it instead, asking once a second, for up to ``db_wait_timeout`` seconds, and starts the moment it
answers. Meanwhile:

* the liveness endpoint answers 200 ``{"status": "waiting for the metadata database", …}``: a
  restarted container would only wait again, later;
* under systemd it says so, and extends the start timeout and feeds the watchdog;
* SIGTERM or SIGINT ends it at once, exit 0 (nothing has started yet);
* one log line when the wait begins, one a minute while it lasts, one when it ends.

A database that answers but is wrong (bad credentials, no such database, not migrated, a bad URL)
is still refused at once, and so is a wait that runs out: one line, exit 2, as before.

The Celery worker waits the same way for its broker (Redis), within the same ``db_wait_timeout``:
an outage of the broker is the same restart storm for every worker pod.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from safe_scheduler.base import exitcodes, output
from safe_scheduler.base.errors import Unreachable, UsageError
from safe_scheduler.liveness import healthserver, systemd
from safe_scheduler.shutdown import signals
from safe_scheduler.startup.settings import SECTION, Settings

log = logging.getLogger("safe_scheduler.startup.dbwait")

#: Seconds between two tries: the start comes at most this long after the database is back.
POLL = 1.0
#: Seconds between two "still waiting" lines.
LOG_EVERY = 60.0


def wait(check: Callable[[], None], settings: Settings, why: str, what: str = "the metadata database") -> None:
    """Return once ``check`` passes; raise UsageError if ``what`` answers wrong or the wait runs out;
    exit 0 on SIGTERM/SIGINT. ``check`` raises ``Unreachable`` while nobody answers."""
    started = time.monotonic()
    timeout = settings.db_wait_timeout
    notifier = systemd.Notifier()
    log.warning("%s does not answer (%s); waiting up to %gs for it ([%s] db_wait_timeout), asking every %gs",
                what[0].upper() + what[1:], why, timeout, SECTION, POLL)
    # A Python handler, so that the signal reaches the listener's wakeup fd at all (the default
    # action would end the process before); the listener acts on it, even while the main thread
    # waits in the driver's connect.
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in signals.SHUTDOWN_SIGNALS}
    listener = signals.SignalListener(lambda name: _stop(name, what))
    listener.start()
    endpoint = _serve_waiting(settings, started, what)
    try:
        next_line = started + LOG_EVERY
        while True:
            notifier.waiting(f"Waiting for {what} ({time.monotonic() - started:.0f}s)")
            try:
                check()
            except Unreachable as exc:
                why = str(exc)
            else:
                log.warning("%s answers again after %.1fs; starting", what[0].upper() + what[1:],
                            time.monotonic() - started)
                return
            waited = time.monotonic() - started
            if waited >= timeout:
                raise UsageError(f"{what} did not answer for {timeout:g}s "
                                 f"([{SECTION}] db_wait_timeout); last: {why}")
            if time.monotonic() >= next_line:
                log.warning("Still waiting for %s after %.0fs (%s)", what, waited, why)
                next_line += LOG_EVERY
            threading.Event().wait(max(0.0, min(POLL, started + timeout - time.monotonic())))
    finally:
        if endpoint is not None:
            endpoint.close()
        listener.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_waiting(settings: Settings, since: float, what: str) -> healthserver.HealthServer | None:
    """The liveness endpoint, answering "waiting" (its port was checked free just before)."""
    if not settings.enable_health_check:
        return None
    try:
        return healthserver.start(settings.health_check_server_host, settings.health_check_server_port,
                                  healthserver.Waiting(since, what))
    except OSError as exc:  # taken since the check (a race): the wait goes on without it
        log.warning("No liveness endpoint while waiting: %s", exc.strerror or exc)
        return None


def _stop(name: str, what: str) -> None:
    """SIGTERM or SIGINT while waiting, heard by the listener's thread (the main thread may be in the
    driver's connect): nothing has started, so leave at once, with 0 as for any signalled stop."""
    output.bounded(output.SAY_GRACE, log.warning, "%s while waiting for %s; exiting", name, what)
    output.flush_logs()
    # From the listener's thread, which is why os._exit: the main thread may wait in the driver's
    # connect. Nothing has started, so nothing is left to stop; the code is a signal's, from the table.
    os._exit(exitcodes.of_stop(exitcodes.Cause.SIGNAL, None))

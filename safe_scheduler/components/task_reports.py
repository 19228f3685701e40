"""Airflow 3's task reports, tried once when the scheduler stops because its database is gone.

On Airflow 3 a LocalExecutor worker supervises its task and reports the task's end through the
execution API, whose client retries a failed call with waits of 1, 3, 7 and 15 s (31 s with
Airflow's defaults, ``[workers] execution_api_retries``). When the scheduler stops because the
metadata database is gone, the api-server's database is gone with it, so each of those reports
fails, and the task process waits for its supervisor's answer all the while. Measured on 3.3.2, a
task whose cleanup took 2 ms held the stop for the whole of its cleanup budget (4 s), and then had
to be killed; its worker then ignored the sweep's SIGTERM (it forwards it to the task) for another
``child_stop_timeout``.

So once the job knows that its database is gone, the workers it forked try each report once: it
fails as it would have after its last retry, the task ends at once, and the next
scheduler resets what could not be reported, as it would have after the retries. The word goes
through one shared page made before the workers fork; workers started by ``spawn`` or
``forkserver`` do not share it and keep Airflow's retries, cut by the cleanup budget as before.
"""

from __future__ import annotations

import logging
import mmap
from typing import Any

log = logging.getLogger("safe_scheduler.task_reports")

#: The errors that say the database cannot be reached (refused, reset, timed out), not a bad query.
_GONE = ("OperationalError", "InterfaceError", "DisconnectionError")
_FROM = ("sqlalchemy", "psycopg2", "psycopg", "pymysql", "MySQLdb")


def database_gone(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from or during, is SQLAlchemy's or a database
    driver's word that the database cannot be reached."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        if type(exc).__name__ in _GONE and type(exc).__module__.split(".")[0] in _FROM:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class TaskReports:
    """The execution API client's retries, given up at once in every process forked after ``hook``."""

    def __init__(self) -> None:
        #: One byte, shared with every process forked from here on (MAP_SHARED, anonymous).
        self._futile = mmap.mmap(-1, 1)

    def hook(self) -> bool:
        """Make the client's retries also stop once ``give_up`` was called; False where there is no
        such client (Airflow 2: a task writes its own state to the database) or it has changed shape."""
        try:
            from airflow.sdk.api.client import Client
        except ImportError:
            return False
        retrying = getattr(Client.request, "retry", None)  # tenacity's Retrying, copied for each call
        stop = getattr(retrying, "stop", None)
        if stop is None or not hasattr(stop, "__or__"):
            log.warning("Airflow's execution API client has no retry policy we know; its retries stay as they are")
            return False
        retrying.stop = stop | self._given_up
        return True

    def give_up(self) -> None:
        """From now on, a report that fails is not tried again (in this process and its forked workers)."""
        self._futile[0] = 1

    def _given_up(self, retry_state: Any) -> bool:
        return self._futile[0] == 1

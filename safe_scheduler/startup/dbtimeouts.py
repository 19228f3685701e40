"""Connection timeouts and TCP keepalives for the metadata database, where the user set none.

A stock install connects to PostgreSQL with no connect timeout and no keepalives: a peer that
vanishes (a partition, a failover that drops the old primary) leaves a socket that waits for the
kernel's defaults, two hours and more. These parameters make libpq notice in seconds. Each one is
added only if the connection does not already carry it (from the URL's query or from
``[database] sql_alchemy_connect_args``), so the operator's own choice always wins.
Turn it all off with ``[safe_scheduler] db_timeouts = False``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("safe_scheduler.startup.dbtimeouts")

#: libpq parameters (psycopg2 and psycopg 3 pass them through); times in seconds, user timeout in ms.
POSTGRES: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}
#: mysqlclient and PyMySQL: only the connect timeout; read timeouts would cut long queries.
MYSQL: dict[str, Any] = {"connect_timeout": 10}


def defaults_for(backend: str) -> dict[str, Any]:
    return {"postgresql": POSTGRES, "mysql": MYSQL}.get(backend, {})


def apply(engine) -> dict[str, Any]:
    """Add our defaults to every new DBAPI connection of ``engine``; return what may be added."""
    from sqlalchemy import event

    defaults = defaults_for(engine.dialect.name)
    if not defaults:
        return {}

    @event.listens_for(engine, "do_connect")
    def _add_defaults(dialect, conn_rec, cargs, cparams) -> None:
        for key, value in defaults.items():
            cparams.setdefault(key, value)

    engine.dispose()  # connections made before this point would go without
    log.info("Metadata DB connections get %s where not set by the user", defaults)
    return defaults

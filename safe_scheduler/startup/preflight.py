"""Checks made before anything starts, each failing with one line that says what to fix.

Stock ``airflow scheduler`` starts its children first and finds out later: a log-server port
already taken leaves a traceback in a child and a scheduler without a log server; a database
that is missing or not migrated gives a long SQLAlchemy traceback. Here they end the command with
exit code 2 before a single process is forked.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import traceback
import warnings

from safe_scheduler import __version__, components
from safe_scheduler.base import exitcodes
from safe_scheduler.base.errors import DatabaseUnreachable, Unreachable, UsageError
from safe_scheduler.base.ports import check_port_free
from safe_scheduler.components.base import Component
from safe_scheduler.startup import dbwait
from safe_scheduler.startup.settings import SECTION, Settings, health_port_key

log = logging.getLogger("safe_scheduler.startup.preflight")

#: Seconds to wait for the metadata database to accept a connection before giving up.
DB_CONNECT_TIMEOUT = 10
#: What drivers say when nobody answers, as opposed to a database that answers "no" (bad
#: credentials, no such database): waiting helps with the first, never with the second.
UNREACHABLE = (
    "connection refused", "timeout expired", "timed out", "could not translate host name",
    "name or service not known", "temporary failure in name resolution", "no route to host",
    "network is unreachable", "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "server closed the connection unexpectedly",
    "connection reset by peer", "can't connect to mysql server", "lost connection to mysql server",
    "unknown mysql server host",
)


#: The database drivers Airflow's metadata URLs name, by module, and the extra that installs each.
DRIVERS = {"psycopg": "postgres", "psycopg2": "postgres", "asyncpg": "postgres", "MySQLdb": "mysql",
           "pymysql": "mysql"}


def prepare(name: str, argv: list[str]) -> tuple[Component, argparse.Namespace, Settings]:
    """Parse, read the settings once, check everything; raise UsageError with one line if anything
    is off (``SystemExit(0)`` for ``--version``, ``--help``)."""
    try:
        return _prepare(name, argv)
    except (UsageError, SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - see _unforeseen
        raise _unforeseen(exc, name) from None


def _load_airflow() -> None:
    try:
        from airflow.configuration import conf  # noqa: F401

        from safe_scheduler.base import compat  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - Airflow fails at import on a broken config
        if os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "x").strip() == "":
            raise UsageError(
                "no metadata database configured: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is empty"
            ) from None
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        driver = DRIVERS.get(getattr(exc, "name", "") or "")
        if isinstance(exc, ModuleNotFoundError) and driver:
            raise UsageError(f"cannot load Airflow: the database driver {exc.name!r} is not installed; install "
                             f"Airflow with its extra: pip install 'apache-airflow[{driver}]' with the "
                             "constraints of your release") from None
        raise UsageError(
            f"cannot load Airflow ({type(exc).__name__}: {message}); "
            "check airflow.cfg and the AIRFLOW__* environment, [database] sql_alchemy_conn first"
        ) from None


def _prepare(name: str, argv: list[str]) -> tuple[Component, argparse.Namespace, Settings]:
    _load_airflow()
    from airflow.configuration import conf

    from safe_scheduler.base import compat
    from safe_scheduler.startup import flags
    from safe_scheduler.startup import settings

    component = components.get(name)
    warnings.simplefilter("ignore")  # again: importing Airflow 2.x installs its own warning filters
    args = flags.build_parser(component, conf).parse_args(argv)
    if args.version:
        print(f"{component.prog} {__version__} (Apache Airflow {compat.AIRFLOW_VERSION})")
        raise SystemExit(exitcodes.OK)
    if compat.wants_hot_reload(args):
        raise UsageError(f"--dev (hot reload) is for development; use '{component.stock} --dev' for that")
    config = settings.load(flags.overrides(args), conf, component)
    component.check(args)
    for server in component.servers(args):
        if server.port:  # a server that binds nothing (the worker's stale-bundle cleanup) has port 0
            check_port_free(server.host, server.port, server.key)
    if config.enable_health_check:
        key = f"[{SECTION}] {health_port_key(component.name)}"
        check_port_free(config.health_check_server_host, config.health_check_server_port, key)
    _answering(lambda: check_metadata_db(conf), config, "the metadata database")
    for capability in component.capabilities:
        for what, check in capability.awaited(args):
            _answering(check, config, what)
    return component, args, config


def _answering(check, config: Settings, what: str) -> None:
    """Run ``check``; while ``what`` does not answer, wait for it (``dbwait``) unless the wait is off."""
    try:
        check()
    except Unreachable as unreachable:
        if not config.db_wait_timeout:
            raise
        dbwait.wait(check, config, str(unreachable), what)


def _unforeseen(exc: BaseException, name: str) -> UsageError:
    """Anything we did not foresee before start is still one line and exit 2, never a traceback."""
    text = str(exc).strip()
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return UsageError(
        f"could not prepare the {name}: {type(exc).__name__}: "
        f"{text.splitlines()[0] if text else 'no message'}{at}"
    )


def _redacted(url) -> str:
    try:
        return url.render_as_string(hide_password=True)
    except AttributeError:  # SQLAlchemy < 1.4.?
        return repr(url)


def _db_state(url) -> str:
    """Return "ready" or "empty"; raise UsageError if the database cannot be reached."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    connect_args = {}
    if url.get_backend_name() in ("postgresql", "mysql"):
        connect_args["connect_timeout"] = DB_CONNECT_TIMEOUT
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
    except Exception as exc:  # noqa: BLE001 - every driver raises its own type
        text = str(getattr(exc, "orig", exc)).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        refusal = DatabaseUnreachable if any(words in text.lower() for words in UNREACHABLE) else UsageError
        raise refusal(f"cannot connect to the metadata database {_redacted(url)}: {first_line}") from None
    finally:
        engine.dispose()
    return "ready" if {"alembic_version", "job"} <= tables else "empty"


def _is_embedded(path: str | None) -> bool:
    """Whether ``path`` is Airflow's embedded default, ``airflow.db`` in AIRFLOW_HOME."""
    from airflow import settings as airflow_settings

    if not path:
        return False
    home = getattr(airflow_settings, "AIRFLOW_HOME", None) or os.environ.get("AIRFLOW_HOME", "~/airflow")
    default = os.path.join(os.path.expanduser(home), "airflow.db")
    return os.path.realpath(os.path.expanduser(path)) == os.path.realpath(default)


def check_metadata_db(conf) -> None:
    """Fail unless the metadata database is configured, reachable and migrated.

    SQLite is Airflow's embedded default (``airflow.db`` in AIRFLOW_HOME): when it is empty we
    migrate it, as ``airflow standalone`` does, so the safe scheduler runs on a fresh machine with no
    setup. Other databases, other SQLite files included, are never created or migrated behind the
    operator's back: a SQLite path that does not exist is refused (a typo would start an empty one).
    """
    from sqlalchemy.engine import make_url

    raw = conf.get("database", "sql_alchemy_conn", fallback="")
    if not raw or not raw.strip():
        raise UsageError(
            "no metadata database configured: set [database] sql_alchemy_conn "
            "(AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)"
        )
    try:
        url = make_url(raw)
    except Exception:  # noqa: BLE001
        raise UsageError("[database] sql_alchemy_conn is not a valid database URL") from None
    embedded = url.get_backend_name() == "sqlite" and _is_embedded(url.database)
    if url.get_backend_name() == "sqlite" and not embedded and url.database and url.database != ":memory:" \
            and not os.path.exists(url.database):
        # Connecting would create it, empty: a typo in the path would start a new, empty database.
        raise UsageError(f"the SQLite metadata database {url.database} does not exist; check [database] "
                         "sql_alchemy_conn (only the embedded default in AIRFLOW_HOME is created for you)")
    if _db_state(url) == "ready":
        return
    if not embedded:
        raise UsageError(
            f"the metadata database {_redacted(url)} is not initialised: run 'airflow db migrate' first"
        )
    log.info("Setting up the embedded SQLite metadata database %s", url.database)
    from safe_scheduler.base import compat

    done = subprocess.run(compat.migrate_db_command(), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"could not set up the SQLite metadata database {url.database}: {last}")

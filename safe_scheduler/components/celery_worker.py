"""``airflow celery worker``: where CeleryExecutor (the official chart's default) runs every task.

It is not an Airflow job: no job row, no heartbeat. Its heartbeat is consumption, whose signs and
whose reconnect live in ``celery_consumption``; a worker with neither exits 4.

Tasks run in children of the pool's processes (on 3.x the pool process supervises the task
process; on 2.x it starts ``airflow tasks run --local``): those are the tasks that get the drain,
SIGTERM and their cleanup time on the way out, as under the scheduler's LocalExecutor. Celery's own
warm shutdown runs beside it in the main thread: it stops consuming and waits for the pool, which
empties as the tasks end. The defaults fit the chart's 600 s ``terminationGracePeriodSeconds``.

What differs per release: ``--team`` (3.2+), logging set-up (3.x's structlog; 2.x's ORM without a
pool and a DB pre-check), the stale-bundle cleanup process (3.x).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from safe_scheduler import compat
from safe_scheduler.component import Component, Server
from safe_scheduler.components.celery_consumption import (
    BROKER_CONNECT_TIMEOUT, Consumption, broker_timeouts,
)
from safe_scheduler.settings import UsageError


def find_command() -> Any:
    """The provider's ``airflow celery worker`` definition: its flags are ours."""
    try:
        from airflow.providers.celery.cli.definition import CELERY_COMMANDS
    except ImportError:
        try:  # providers before the CLI moved to its own module
            from airflow.providers.celery.executors.celery_executor import CELERY_COMMANDS
        except ImportError:
            raise UsageError(
                "the Celery provider is not installed: pip install 'apache-airflow-providers-celery' "
                "(or apache-airflow[celery]) with the constraints of your Airflow release"
            ) from None
    return next(command for command in CELERY_COMMANDS if command.name == "worker")


def check(args: argparse.Namespace) -> None:
    """What ``airflow celery worker`` refuses from its flags and config (``--team``: 3.2+, multi_team)."""
    from airflow.configuration import conf

    if getattr(args, "team", None):
        if compat.AIRFLOW_VERSION < compat.Version("3.2.0"):
            raise UsageError("--team needs Airflow 3.2 or higher")
        if not conf.getboolean("core", "multi_team", fallback=False):
            raise UsageError("--team option may only be used when [core] multi_team is enabled")


def log_server_port() -> int:
    """``[logging] worker_log_server_port``, where the worker serves its task logs."""
    return int(compat.conf_get("logging", "worker_log_server_port", "8793"))


def stale_bundle_cleanup_interval() -> int:
    """3.x: seconds between the stale-bundle cleanup process's sweeps; 0 where there is none."""
    if not compat.AIRFLOW_3:
        return 0
    from airflow.configuration import conf

    try:
        return max(0, conf.getint("dag_processor", "stale_bundle_cleanup_interval", fallback=0))
    except Exception:  # noqa: BLE001 - the stock command starts none when it cannot read it
        return 0


def _bundle_cleanup(check_interval: int) -> None:
    """The stock worker's stale-bundle cleanup process, as a server of ours."""
    import time

    from airflow.dag_processing.bundles.base import BundleUsageTrackingManager

    manager = BundleUsageTrackingManager()
    while True:
        time.sleep(check_interval)
        manager.remove_stale_bundle_versions()


def servers(args: argparse.Namespace) -> list[Server]:
    found = []
    if not args.skip_serve_logs:
        port = log_server_port()
        found.append(Server("serve-logs", compat.serve_logs_target(port), "", port, "[logging] worker_log_server_port"))
    interval = stale_bundle_cleanup_interval()
    if interval:
        import functools

        # No port: host "" and port 0 are never checked (``preflight`` checks only what binds).
        found.append(Server("stale-bundle-cleanup", functools.partial(_bundle_cleanup, interval), "", 0, ""))
    return found


class CeleryWorker:
    """The worker as the stock command builds it, with our bootsteps, not yet started."""

    def __init__(self, app: Any, options: list[str]) -> None:
        self.app = app
        self.options = options
        self.pool: Any = None  # the WorkController's pool, once it has started
        self.consumption = Consumption(app, self.pool_size)
        app.steps["worker"].add(_pool_seen(self))

    def run(self) -> None:
        """Celery's ``worker_main``, keeping the worker's exit code (``worker_main`` drops it)."""
        code = self.app.start(argv=self.options)
        if code:
            raise SystemExit(code)

    def pool_size(self) -> int:
        try:
            return int(self.pool.num_processes or 0)
        except Exception:  # noqa: BLE001 - no pool yet
            return 0

    def pool_pids(self) -> set[int]:
        """The pool's processes (prefork); none for the threads, solo, eventlet and gevent pools."""
        try:
            return {p.pid for p in list(self.pool._pool._pool) if isinstance(getattr(p, "pid", None), int)}
        except Exception:  # noqa: BLE001 - not a process pool, or not started yet
            return set()


def _pool_seen(worker: CeleryWorker) -> type:
    """A worker bootstep that hands us the pool once Celery has made it (its processes run the tasks)."""
    from celery import bootsteps

    class PoolSeen(bootsteps.StartStopStep):
        requires = ("celery.worker.components:Pool",)

        def start(self, controller: Any) -> None:
            worker.pool = controller.pool

    return PoolSeen


def _celery_app(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Celery app and the config it reads, as the stock command picks them (``--team``: 3.2+)."""
    from airflow.configuration import conf

    if getattr(args, "team", None):
        from airflow.executors.base_executor import ExecutorConf
        from airflow.providers.celery.executors.celery_executor_utils import create_celery_app

        team_config = ExecutorConf(team_name=args.team)
        return create_celery_app(team_config), team_config
    from airflow.providers.celery.executors.celery_executor import app

    return app, conf


def _refuse_duplicate_hostname(app: Any, hostname: str) -> None:
    """The stock check, on a throwaway app: kombu's pools are reset after (Airflow #59707)."""
    import kombu.pools
    from celery import Celery

    temp_app = Celery()
    temp_app.conf.update(app.conf)
    try:
        active = temp_app.control.inspect().active_queues()
        if active and any(name.endswith(f"@{hostname}") for name in active):
            raise SystemExit(
                f"Error: A worker with hostname '{hostname}' is already running. "
                "Please use a different hostname or stop the existing worker first."
            )
    finally:
        temp_app.close()
        kombu.pools.reset()


def _configure_logging(config: Any) -> None:
    """What the stock command sets up before the worker starts: 3.x's structlog, 2.x's ORM."""
    if compat.AIRFLOW_3:
        from airflow.sdk.log import configure_logging

        json_raw = config.get("celery", "json_logs", fallback="")
        if json_raw and json_raw.lower() != "none":
            json_output = config.getboolean("celery", "json_logs")
        else:
            json_output = config.getboolean("logging", "json_logs", fallback=False)
        try:
            configure_logging(output=sys.stdout.buffer, json_output=json_output)
        except TypeError:  # 3.0's SDK has no json_output
            configure_logging(output=sys.stdout.buffer)
        return
    from airflow import settings as airflow_settings

    # Stock: no connection pool, so the worker holds no idle DB connection; and a pre-check.
    airflow_settings.reconfigure_orm(disable_connection_pool=True)
    if not airflow_settings.validate_session():
        raise SystemExit("Worker exiting, database connection precheck failed.")


def new_job_runner(args: argparse.Namespace) -> CeleryWorker:
    """The worker, set up as the installed ``airflow celery worker`` sets it up, not yet started."""
    import sqlalchemy.exc
    from celery import maybe_patch_concurrency

    app, config = _celery_app(args)
    if args.celery_hostname:
        _refuse_duplicate_hostname(app, args.celery_hostname)
    _configure_logging(config)
    autoscale = args.autoscale
    if autoscale is None and config.has_option("celery", "worker_autoscale"):
        autoscale = config.get("celery", "worker_autoscale")
    if hasattr(app.backend, "ResultSession"):  # the stock command creates the result tables first
        with suppress(sqlalchemy.exc.IntegrityError):
            app.backend.ResultSession().close()
    loglevel = config.get("logging", "CELERY_LOGGING_LEVEL") or config.get("logging", "LOGGING_LEVEL")
    if args.verbose:
        loglevel = "DEBUG"
    options = ["worker", "-O", "fair", "--queues", args.queues, "--concurrency", str(args.concurrency),
               "--loglevel", loglevel]
    if args.celery_hostname:
        options += ["--hostname", args.celery_hostname]
    if autoscale:
        options += ["--autoscale", autoscale]
    if args.without_mingle:
        options.append("--without-mingle")
    if args.without_gossip:
        options.append("--without-gossip")
    if config.has_option("celery", "pool"):
        pool = config.get("celery", "pool")
        options += ["--pool", pool]
        maybe_patch_concurrency(["-P", pool])
    broker_timeouts(app)
    return CeleryWorker(app, options)


def check_broker(args: argparse.Namespace) -> None:
    """A Redis broker must answer a PING (``BrokerUnreachable`` while it does not, so that the start
    waits for it); one that refuses us (a password, a bad URL) is refused at once. Other brokers are
    left to Celery's own retries on start-up."""
    from safe_scheduler.dbwait import BrokerUnreachable

    app, _ = _celery_app(args)
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://")):
        return
    import redis
    from kombu.utils.url import maybe_sanitize_url as redacted

    try:
        client = redis.Redis.from_url(url, socket_timeout=BROKER_CONNECT_TIMEOUT,
                                      socket_connect_timeout=BROKER_CONNECT_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if isinstance(exc, redis.AuthenticationError):
            raise UsageError(f"the Celery broker {redacted(url)} refused us: {exc}") from None
        raise BrokerUnreachable(f"cannot reach the Celery broker {redacted(url)}: {exc}") from None
    except (redis.RedisError, ValueError) as exc:
        raise UsageError(f"the Celery broker {redacted(url)} answers wrong: {type(exc).__name__}: {exc}") from None


def on_progress(worker: CeleryWorker, callback: Callable[[], None]) -> None:
    worker.consumption.on_sign.append(callback)


def recover(worker: CeleryWorker) -> str:
    return worker.consumption.reconnect()


def daemon_options(args: argparse.Namespace) -> dict[str, Any]:
    """``-D``: the worker's umask (``--umask``, else ``[celery] worker_umask``) and pid file."""
    from airflow import settings as airflow_settings
    from airflow.configuration import conf
    from airflow.utils.cli import setup_locations

    umask = args.umask or conf.get("celery", "worker_umask", fallback=airflow_settings.DAEMON_UMASK)
    pid_file, _, _, _ = setup_locations(process="worker", stdout=args.stdout, stderr=args.stderr,
                                        log=args.log_file, pid=args.pid)
    return {"umask": umask, "pid_file": pid_file}


COMPONENT = Component(
    name="celery-worker",
    health_threshold=None,
    new_job_runner=new_job_runner,
    health_port=8978,
    # The chart gives workers 600 s from SIGTERM to SIGKILL: 585 are the deadline, and the backstops
    # behind it (8 s) and our parent's last sweep (5 s) fit in the rest. The tasks' cleanup (on_kill,
    # on_termination) gets 60 s, and the drain whatever is left once that, the children's stop and
    # the kills are paid: 518 s by default, less under a shorter shutdown_timeout (settings.load),
    # never a refusal. No heartbeat of Airflow's to derive the stall timeout from: 60 s, six times
    # BROKER_SOCKET_TIMEOUT, so one command's timeout comes first.
    defaults={"shutdown_timeout": 585.0, "task_cleanup_timeout": 60.0, "stall_timeout": 60.0},
    run=CeleryWorker.run,
    on_progress=on_progress,
    servers=servers,
    check=check,
    check_broker=check_broker,
    task_parents=CeleryWorker.pool_pids,
    process_name="worker",
    hurry_signals=("SIGQUIT",),
    progress="sign of consumption",
    recover=recover,
    find_command=find_command,
    stock_words=("celery", "worker"),
    daemon_options=daemon_options,
)

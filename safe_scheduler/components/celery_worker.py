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

from safe_scheduler.base import compat
from safe_scheduler.base.errors import UsageError
from safe_scheduler.components import celery_broker
from safe_scheduler.components.base import Capability, Component, Job, Run, Server, Tasks
from safe_scheduler.components.celery_consumption import Consumption, broker_timeouts


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
    _tasks_outlive_a_killed_worker()
    return CeleryWorker(app, options)


def _tasks_outlive_a_killed_worker() -> None:
    """Celery 5.3+ gives each pool process SIGKILL as its death signal: a ``kill -9`` of the worker
    would kill the pool, and the tasks below it would lose their try (and race the parent's sweep
    for their cleanup). The lifeline (``forkhook``) ends a pool process once the worker is gone,
    after its tasks have had ``orphaned_task_timeout`` and their cleanup."""
    from celery import platforms

    if hasattr(platforms, "set_pdeathsig"):  # read by the pool's initializer at each fork
        platforms.set_pdeathsig = lambda *args, **kwargs: None


def _daemon_options(args: argparse.Namespace) -> dict[str, Any]:
    """``-D``: the worker's umask (``--umask``, else ``[celery] worker_umask``) and pid file."""
    from airflow import settings as airflow_settings
    from airflow.configuration import conf
    from airflow.utils.cli import setup_locations

    umask = args.umask or conf.get("celery", "worker_umask", fallback=airflow_settings.DAEMON_UMASK)
    pid_file, _, _, _ = setup_locations(process="worker", stdout=args.stdout, stderr=args.stderr,
                                        log=args.log_file, pid=args.pid)
    return {"umask": umask, "pid_file": pid_file}


class WorkerJob(Job):
    """The worker is not an Airflow job: no job row, no heartbeat. Its heartbeat is consumption
    (``celery_consumption``), its run Celery's ``worker_main``, its cold shutdown SIGQUIT."""

    progress = "sign of consumption"
    hurry_signals = ("SIGQUIT",)

    def __init__(self) -> None:
        # No heartbeat of Airflow's to derive the stall timeout from: six times the broker's socket
        # timeout, so that one command's timeout comes first.
        super().__init__(new_job_runner, None, stall_timeout=60.0)

    def stock_words(self, name: str) -> tuple[str, ...]:
        return ("celery", "worker")

    def airflow_command(self, name: str) -> Any:
        return find_command()

    def defaults(self) -> dict[str, float]:
        # The chart gives workers 600 s from SIGTERM to SIGKILL: 585 are the deadline, and the
        # backstops behind it (8 s) and our parent's last sweep (5 s) fit in the rest.
        return {"shutdown_timeout": 585.0}

    def run(self, worker: CeleryWorker) -> Any:
        return worker.run()

    def on_progress(self, worker: CeleryWorker, callback: Callable[[], None]) -> None:
        worker.consumption.on_sign.append(callback)

    def daemon_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return _daemon_options(args)


class Broker(Capability):
    """The worker's broker: waited for at start like the metadata database, and reconnected to,
    once, when consumption stops for ``stall_timeout`` (the stall watchdog's recovery)."""

    waits_for = "a Celery broker"

    def awaited(self, args: argparse.Namespace) -> list[tuple[str, Callable[[], None]]]:
        app, _ = _celery_app(args)
        url = str(app.conf.broker_url or "")
        return [("the Celery broker", lambda: celery_broker.check(url))]

    def attach(self, worker: CeleryWorker, run: Run) -> None:
        run.stall.recover = worker.consumption.reconnect


COMPONENT = Component(
    name="celery-worker",
    health_port=8978,
    job=WorkerJob(),
    servers=servers,
    check=check,
    # The tasks' cleanup (on_kill, on_termination) gets 60 s, and the drain whatever the 585 s
    # deadline leaves once that, the children's stop and the kills are paid (budget.derive).
    tasks=Tasks(parents=CeleryWorker.pool_pids, cleanup=60.0),
    capabilities=(Broker(),),
)

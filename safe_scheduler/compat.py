"""Everything that differs between Airflow versions, and nothing else.

The rest of the package asks this module for "the scheduler's CLI arguments", "a job runner",
"the serve-logs target", and never looks at ``airflow.__version__`` itself.

Supported: 2.6.3 (the release of the original zombie report, Airflow #32706), the last 2.x line
(2.10/2.11) and 3.0 to 3.3. Where an API simply appeared or moved, we look for it rather than
compare version numbers, so that releases in between work the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from packaging.version import Version

import airflow

AIRFLOW_VERSION = Version(airflow.__version__)
AIRFLOW_3 = AIRFLOW_VERSION >= Version("3.0.0")


def cli_command(name: str = "scheduler") -> Any:
    """The ``ActionCommand`` definition of the installed Airflow's ``airflow <name>`` command."""
    from airflow.cli import cli_config

    for command in cli_config.core_commands:
        if command.name == name:
            return command
    raise RuntimeError(f"the installed Airflow has no '{name}' command")


def add_airflow_args(parser: argparse.ArgumentParser, name: str = "scheduler") -> None:
    """Add the installed ``airflow <name>`` flags to ``parser``, in Airflow's order (sorted)."""
    args = sorted(cli_command(name).args, key=lambda a: (a.flags[-1].lstrip("-").lower()))
    for arg in args:
        kwargs = dict(arg.kwargs)
        if "help" in kwargs and kwargs["help"] is not None:
            kwargs["help"] = str(kwargs["help"])  # Airflow uses lazy proxies for some help texts
        parser.add_argument(*arg.flags, **kwargs)


def print_banner() -> None:
    from airflow import settings as airflow_settings
    from airflow.utils import cli as cli_utils

    if hasattr(cli_utils, "print_banner"):  # 3.x: also honours json_logs
        cli_utils.print_banner()
    else:
        print(airflow_settings.HEADER)


def wants_hot_reload(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "dev", False))


def with_providers_configuration(func: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap ``func`` as Airflow wraps its scheduler command: provider config loaded first (2.7+)."""
    try:
        from airflow.utils.providers_configuration_loader import providers_configuration_loaded
    except ImportError:
        return func
    return providers_configuration_loaded(func)


def run_with_daemon_option(
    args: argparse.Namespace, callback: Callable[[], None], process_name: str = "scheduler"
) -> None:
    """Run ``callback`` in this process or daemonised, exactly as ``airflow <process_name>`` does."""
    try:
        from airflow.cli.commands.daemon_utils import run_command_with_daemon_option
    except ImportError:
        run_command_with_daemon_option = None
    if run_command_with_daemon_option is None:
        # Outside the ``except`` block: every exception of the job would otherwise carry this
        # ImportError as its context, and the exit code and the log line follow the context's root.
        _run_with_daemon_option_inline(args, callback, process_name)
        return
    run_command_with_daemon_option(
        args=args, process_name=process_name, callback=callback, should_setup_logging=True
    )


def _run_with_daemon_option_inline(args: argparse.Namespace, callback: Callable[[], None], process_name: str) -> None:
    """What each ``airflow`` command did itself before ``daemon_utils`` existed (2.6, 2.7)."""
    import signal

    from airflow import settings as airflow_settings
    from airflow.utils.cli import setup_locations, setup_logging, sigint_handler, sigquit_handler

    if not args.daemon:
        signal.signal(signal.SIGINT, sigint_handler)
        signal.signal(signal.SIGTERM, sigint_handler)
        signal.signal(signal.SIGQUIT, sigquit_handler)
        callback()
        return

    import daemon
    from daemon.pidfile import TimeoutPIDLockFile

    pid, stdout, stderr, log_file = setup_locations(process_name, args.pid, args.stdout, args.stderr, args.log_file)
    handle = setup_logging(log_file)
    with open(stdout, "a") as stdout_handle, open(stderr, "a") as stderr_handle:
        stdout_handle.truncate(0)
        stderr_handle.truncate(0)
        ctx = daemon.DaemonContext(
            pidfile=TimeoutPIDLockFile(pid, -1),
            files_preserve=[handle],
            stdout=stdout_handle,
            stderr=stderr_handle,
            umask=int(airflow_settings.DAEMON_UMASK, 8),
        )
        with ctx:
            callback()


_MISSING = object()


def airflow_has_key(section: str, key: str) -> bool:
    """Whether the installed Airflow defines ``[section] key`` itself (not only the user's config).

    ``conf.has_option`` is true for any key the user sets, even one this Airflow never reads
    (``[scheduler] scheduler_health_check_server_host`` on 2.6): the defaults tell what it reads.
    """
    from airflow.configuration import conf

    if hasattr(conf, "airflow_defaults"):  # 2.6: default_airflow.cfg parsed as it is
        return conf.airflow_defaults.has_option(section, key)
    return conf.get_default_value(section, key, fallback=_MISSING) is not _MISSING


def conf_get(section: str, key: str, default: str) -> str:
    """``[section] key`` as the installed Airflow reads it, or ``default`` where it has no such key.

    ``default`` is what that Airflow does instead (e.g. the address its server binds when it has
    no setting for it), so that we check and run exactly what stock Airflow would.
    """
    from airflow.configuration import conf

    return conf.get(section, key) if airflow_has_key(section, key) else default


def health_check_enabled() -> bool:
    """``[scheduler] enable_health_check`` (off by default; every supported release has the key)."""
    from airflow.configuration import conf

    return conf.getboolean("scheduler", "enable_health_check")


def health_check_address() -> tuple[str, int]:
    """Where the installed Airflow's scheduler health server binds: 2.6 has no host setting, 0.0.0.0."""
    host = conf_get("scheduler", "scheduler_health_check_server_host", "0.0.0.0")
    return host, int(conf_get("scheduler", "scheduler_health_check_server_port", "8974"))


def log_server_port() -> int:
    """``[logging] worker_log_server_port``, which serve-logs binds on every address."""
    return int(conf_get("logging", "worker_log_server_port", "8793"))


def set_mp_start_method(component: str) -> None:
    """Apply ``[core] mp_start_method`` and the component's own override (3.3+), as its command does."""
    from airflow.utils import process_utils

    if hasattr(process_utils, "set_component_mp_start_method"):
        process_utils.set_component_mp_start_method(component.replace("-", "_"))


def new_scheduler_runner(args: argparse.Namespace) -> Any:
    """A ``SchedulerJobRunner`` set up as the installed ``airflow scheduler`` command sets it up."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    kwargs: dict[str, Any] = {"job": Job(), "num_runs": args.num_runs}
    if hasattr(args, "only_idle"):  # 3.2+
        kwargs["only_idle"] = args.only_idle
    if hasattr(args, "subdir"):  # 2.x: the scheduler parsed DAGs itself
        from airflow.utils.cli import process_subdir

        kwargs["subdir"] = process_subdir(args.subdir)
    if hasattr(args, "do_pickle"):  # 2.x
        kwargs["do_pickle"] = args.do_pickle
    runner = SchedulerJobRunner(**kwargs)

    from airflow.executors.executor_loader import ExecutorLoader

    if not AIRFLOW_3 and hasattr(ExecutorLoader, "validate_database_executor_compatibility"):
        # 2.x refuses a parallel executor on SQLite before it starts; 3.x does it in the executor.
        for executor in executors(runner):
            ExecutorLoader.validate_database_executor_compatibility(type(executor))
    try:  # 2.6-2.10: the scheduler must talk to the DB directly, not through the internal API
        from airflow.api_internal.internal_api_call import InternalApiConfig
    except ImportError:
        pass
    else:
        if hasattr(InternalApiConfig, "force_database_direct_access"):
            InternalApiConfig.force_database_direct_access()
    return runner


def executors(job_runner: Any) -> list[Any]:
    """The executors the scheduler will ``start()`` and ``end()`` (several since 2.10)."""
    found = getattr(job_runner, "executors", None)
    if found is None:
        found = [job_runner.job.executor]
    return list(found)


def celery_broker_url() -> str:
    """``[celery] broker_url``, or "" (the key comes with the Celery provider)."""
    from airflow.configuration import conf

    try:
        return conf.get("celery", "broker_url", fallback="") or ""
    except Exception:  # noqa: BLE001 - a secret backend's failure is the executor's to report
        return ""


def executor_worker_pids(executors: list[Any]) -> set[int]:
    """The processes in which the executors run tasks on this host: each task is a child of one.

    LocalExecutor keeps its workers in ``workers``: a dict by pid from Airflow 3, a list of
    ``QueuedLocalWorker`` in 2.x. With ``parallelism = 0`` Airflow 2 starts one ``LocalWorker`` per
    task and keeps none, so those are found among multiprocessing's children by their class.
    Executors that run tasks elsewhere (Celery, Kubernetes) have none.
    """
    import multiprocessing.process

    pids: set[int] = set()
    for executor in executors:
        workers = getattr(executor, "workers", None)
        if isinstance(workers, dict):
            workers = list(workers.values())
        if not isinstance(workers, (list, tuple)):
            continue
        pids.update(w.pid for w in list(workers) if isinstance(getattr(w, "pid", None), int))
    try:  # read-only look at multiprocessing's own set: active_children() would reap, racing join()
        children = list(multiprocessing.process._children)
    except (AttributeError, RuntimeError):
        children = []
    pids.update(c.pid for c in children if type(c).__name__ == "LocalWorker" and c.pid)
    return pids


def run_job(job_runner: Any) -> int | None:
    from airflow.jobs.job import run_job as airflow_run_job

    return airflow_run_job(job=job_runner.job, execute_callable=job_runner._execute)


def serves_logs() -> bool:
    """Whether any configured executor wants the scheduler to serve task logs."""
    from airflow.executors.executor_loader import ExecutorLoader

    if not hasattr(ExecutorLoader, "get_executor_names"):  # before 2.10: one executor
        return ExecutorLoader.import_default_executor_cls()[0].serve_logs
    return any(
        ExecutorLoader.import_executor_cls(name)[0].serve_logs for name in ExecutorLoader.get_executor_names()
    )


def serve_logs_target(port: int | None = None) -> Callable[[], None]:
    """serve-logs on ``port``, or on ``[logging] worker_log_server_port`` (the scheduler's)."""
    import functools

    from airflow.utils.serve_logs import serve_logs

    return serve_logs if port is None else functools.partial(serve_logs, port=port)


def trigger_log_server_port() -> int:
    """``[logging] trigger_log_server_port``, where the triggerer serves its trigger logs."""
    from airflow.configuration import conf

    return conf.getint("logging", "trigger_log_server_port", fallback=8794)


def check_triggerer_args(args: argparse.Namespace) -> None:
    """What ``airflow triggerer`` refuses from its flags and config (3.x: ``--queues``, ``--team-name``;
    a team that does not exist fails its job as in stock)."""
    from airflow.configuration import conf

    from safe_scheduler.settings import UsageError

    if getattr(args, "queues", None) and not conf.getboolean("triggerer", "queues_enabled", fallback=False):
        raise UsageError("--queues option may only be used when [triggerer] queues_enabled is True")
    if getattr(args, "team_name", None) and not conf.getboolean("core", "multi_team", fallback=False):
        raise UsageError("--team-name option may only be used when [core] multi_team is enabled")


def prepare_triggerer(args: argparse.Namespace) -> None:
    """Secrets masking in the triggerer's logs, as ``airflow triggerer`` turns it on."""
    try:
        from airflow.sdk._shared.secrets_masker import SecretsMasker  # 3.x

        SecretsMasker.enable_log_masking()
    except ImportError:
        from airflow import settings as airflow_settings

        airflow_settings.MASK_SECRETS_IN_LOGS = True


def new_triggerer_runner(args: argparse.Namespace) -> Any:
    """A ``TriggererJobRunner`` set up as the installed ``airflow triggerer`` sets it up."""
    import inspect

    from airflow.configuration import conf
    from airflow.jobs.job import Job
    from airflow.jobs.triggerer_job_runner import TriggererJobRunner

    kwargs: dict[str, Any] = {
        "job": Job(heartrate=conf.getfloat("triggerer", "JOB_HEARTBEAT_SEC")),
        "capacity": args.capacity,
    }
    accepted = inspect.signature(TriggererJobRunner.__init__).parameters
    if "queues" in accepted:  # 3.2+
        kwargs["queues"] = set(args.queues) if getattr(args, "queues", None) else None
    if "team_name" in accepted:
        kwargs["team_name"] = getattr(args, "team_name", None)
    return TriggererJobRunner(**kwargs)


def check_dag_processor_args(args: argparse.Namespace) -> None:
    """What ``airflow dag-processor`` refuses: on 2.x it runs only standalone, and not on SQLite."""
    from airflow.configuration import conf

    from safe_scheduler.settings import UsageError

    if AIRFLOW_3:
        if getattr(args, "bundle_name", None):
            from airflow.utils.cli import validate_dag_bundle_arg

            try:
                validate_dag_bundle_arg(args.bundle_name)
            except SystemExit as exc:
                raise UsageError(str(exc.code)) from None
        return
    if not conf.getboolean("scheduler", "standalone_dag_processor"):
        raise UsageError("the dag-processor runs only with [scheduler] standalone_dag_processor = True")
    if conf.get("database", "sql_alchemy_conn").lower().startswith("sqlite"):
        raise UsageError("a standalone dag-processor is not supported with SQLite")


def prepare_dag_processor(args: argparse.Namespace) -> None:
    """2.10+: ``airflow dag-processor`` reloads its logging and DB settings before it runs."""
    try:
        from airflow.dag_processing.manager import reload_configuration_for_dag_processing
    except ImportError:
        return
    reload_configuration_for_dag_processing()


def new_dag_processor_runner(args: argparse.Namespace) -> Any:
    """A ``DagProcessorJobRunner`` set up as the installed ``airflow dag-processor`` sets it up."""
    from airflow.dag_processing.manager import DagFileProcessorManager
    from airflow.jobs.dag_processor_job_runner import DagProcessorJobRunner
    from airflow.jobs.job import Job

    if AIRFLOW_3:
        manager = DagFileProcessorManager(max_runs=args.num_runs, bundle_names_to_parse=args.bundle_name)
    else:
        # 2.x's manager calls multiprocessing.connection.wait() without importing the module: with
        # no parsing process started yet (an empty DAG folder) stock crashes at its first loop.
        import multiprocessing.connection  # noqa: F401
        from datetime import timedelta

        from airflow.configuration import conf

        manager = DagFileProcessorManager(
            processor_timeout=timedelta(seconds=conf.getint("core", "dag_file_processor_timeout")),
            dag_directory=args.subdir,
            max_runs=args.num_runs,
            dag_ids=[],
            pickle_dags=args.do_pickle,
        )
    return DagProcessorJobRunner(job=Job(), processor=manager)


def forget_inherited_db_connections() -> None:
    """In a forked server: drop the pooled DB connections inherited from the job process, unused.

    They are the job process's own sockets. Airflow checks the pid when a pooled connection is
    checked out, but SQLAlchemy pings it first (``[database] sql_alchemy_pool_pre_ping``, on by
    default): the ping goes out on the job's socket and can read the reply to the job's query, and
    the job then waits for that reply forever. Seen in CI: stock 2.11.2 with ``[scheduler]
    enable_health_check`` scheduled nothing for 6 minutes, its main thread in
    ``adopt_or_reset_orphaned_tasks`` waiting for a reply the health-check child had read when it
    answered its first request. ``dispose(close=False)`` is SQLAlchemy's remedy for a forked child:
    a new pool, the old connections neither used nor closed (closing would end the job's sessions).
    """
    from airflow import settings

    engine = getattr(settings, "engine", None)
    if engine is not None:
        engine.dispose(close=False)


def health_check_target() -> Callable[[], None]:
    from airflow.utils.scheduler_health import serve_health_check

    return serve_health_check


def migrate_db_command() -> list[str]:
    """The command that creates or upgrades the metadata database (``db upgrade`` before 2.7)."""
    verb = "migrate" if AIRFLOW_VERSION >= Version("2.7.0") else "upgrade"
    return [sys.executable, "-m", "airflow", "db", verb]


def stats() -> Any:
    """Airflow's metrics facade: something with ``incr``, ``gauge`` and ``timing``."""
    try:
        from airflow._shared.observability.metrics import stats as airflow_stats  # 3.2+

        return airflow_stats
    except ImportError:
        from airflow.stats import Stats  # 2.x, 3.0, 3.1

        return Stats


def metadata_engine() -> Any:
    """The SQLAlchemy engine the scheduler uses for the metadata database."""
    from airflow import settings as airflow_settings

    return airflow_settings.engine


def on_heartbeat(job_runner: Any, callback: Callable[[], None]) -> None:
    """Call ``callback`` after each *successful* job heartbeat, in the thread that heartbeats.

    Every job heartbeats through ``Job.heartbeat(heartbeat_callback)``, which calls that callback
    only once the heartbeat row is committed; who calls it differs (the 3.x triggerer heartbeats
    from its runner supervisor, not its job runner), so the hook sits on the job itself.
    """
    job = job_runner.job
    original = job.heartbeat

    def heartbeat(heartbeat_callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def on_recorded(*cb_args: Any, **cb_kwargs: Any) -> Any:
            result = heartbeat_callback(*cb_args, **cb_kwargs)
            callback()
            return result

        return original(on_recorded, *args, **kwargs)

    job.heartbeat = heartbeat


def stock_scheduler_leaks_children_on_error() -> bool:
    """Whether the installed ``airflow scheduler`` has the zombie path of Airflow #32706.

    There, ``_serve_logs``/``_serve_health_check`` stop their child only after a clean ``yield``
    (no ``try/finally``): an exception in the scheduler leaves the child running, and
    ``multiprocessing`` joins it forever at interpreter exit.
    """
    import inspect

    try:
        from airflow.cli.commands import scheduler_command

        source = inspect.getsource(scheduler_command._serve_logs)
    except (ImportError, AttributeError, OSError):
        return False
    return "finally" not in source


def tasks_need_api_server_and_dag_processor() -> bool:
    """Whether tasks run only with an ``airflow api-server`` and a separate ``airflow dag-processor``.

    From Airflow 3 a task talks to the execution API instead of the database, and the scheduler no
    longer parses DAG files itself; before, ``airflow scheduler`` alone runs tasks.
    """
    import importlib.util

    try:
        return importlib.util.find_spec("airflow.api_fastapi.execution_api") is not None
    except ModuleNotFoundError:  # no airflow.api_fastapi at all
        return False

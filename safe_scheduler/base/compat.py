"""What differs between Airflow versions and more than one component needs, and nothing else.

What only one component needs lives in that component (``components/``). The rest of the package
asks this module for "the command's CLI arguments", "run the job", "the serve-logs target", and
never looks at ``airflow.__version__`` itself.

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


def add_airflow_args(parser: argparse.ArgumentParser, command: Any) -> None:
    """Add the flags of ``command`` (an ``ActionCommand``) to ``parser``, in Airflow's order (sorted)."""
    args = sorted(command.args, key=lambda a: (a.flags[-1].lstrip("-").lower()))
    for arg in args:
        kwargs = dict(arg.kwargs)
        if "help" in kwargs and kwargs["help"] is not None:
            kwargs["help"] = str(kwargs["help"])  # Airflow uses lazy proxies for some help texts
        if "--dev" in arg.flags:  # parsed, to be refused with one line (preflight), but not offered
            kwargs["help"] = argparse.SUPPRESS
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
    args: argparse.Namespace, callback: Callable[[], None], process_name: str = "scheduler", **options: Any
) -> None:
    """Run ``callback`` in this process or daemonised, exactly as ``airflow <process_name>`` does
    (``options``: the worker's ``umask`` and ``pid_file``)."""
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
        args=args, process_name=process_name, callback=callback, should_setup_logging=True, **options
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


def set_mp_start_method(key: str) -> None:
    """Apply ``[core] mp_start_method`` and the component's own override (3.3+), as its command
    does; ``key`` is the component's (``Component.key``)."""
    from airflow.utils import process_utils

    if hasattr(process_utils, "set_component_mp_start_method"):
        process_utils.set_component_mp_start_method(key)


def run_job(job_runner: Any) -> int | None:
    from airflow.jobs.job import run_job as airflow_run_job

    return airflow_run_job(job=job_runner.job, execute_callable=job_runner._execute)


def serve_logs_target(port: int | None = None) -> Callable[[], None]:
    """serve-logs on ``port``, or on ``[logging] worker_log_server_port`` (the scheduler's)."""
    import functools

    from airflow.utils.serve_logs import serve_logs

    return serve_logs if port is None else functools.partial(serve_logs, port=port)


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

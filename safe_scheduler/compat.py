"""Everything that differs between Airflow versions, and nothing else.

The rest of the package asks this module for "the scheduler's CLI arguments", "a job runner",
"the serve-logs target", and never looks at ``airflow.__version__`` itself.
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


def scheduler_cli_command() -> Any:
    """The ``ActionCommand`` definition of the installed Airflow's ``scheduler`` command."""
    from airflow.cli import cli_config

    for command in cli_config.core_commands:
        if command.name == "scheduler":
            return command
    raise RuntimeError("the installed Airflow has no 'scheduler' command")


def add_airflow_args(parser: argparse.ArgumentParser) -> None:
    """Add the installed ``airflow scheduler`` flags to ``parser``, in Airflow's order (sorted)."""
    args = sorted(scheduler_cli_command().args, key=lambda a: (a.flags[-1].lstrip("-").lower()))
    for arg in args:
        kwargs = dict(arg.kwargs)
        if "help" in kwargs and kwargs["help"] is not None:
            kwargs["help"] = str(kwargs["help"])  # Airflow uses lazy proxies for some help texts
        parser.add_argument(*arg.flags, **kwargs)


def print_banner() -> None:
    from airflow.utils import cli as cli_utils

    cli_utils.print_banner()


def wants_hot_reload(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "dev", False))


def with_providers_configuration(func: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap ``func`` as Airflow wraps its scheduler command: provider config loaded first."""
    from airflow.utils.providers_configuration_loader import providers_configuration_loaded

    return providers_configuration_loaded(func)


def run_with_daemon_option(args: argparse.Namespace, callback: Callable[[], None]) -> None:
    """Run ``callback`` in this process or daemonised, exactly as ``airflow scheduler`` does."""
    from airflow.cli.commands.daemon_utils import run_command_with_daemon_option

    run_command_with_daemon_option(
        args=args, process_name="scheduler", callback=callback, should_setup_logging=True
    )


def set_mp_start_method() -> None:
    from airflow.utils import process_utils

    if hasattr(process_utils, "set_component_mp_start_method"):
        process_utils.set_component_mp_start_method("scheduler")


def new_job_runner(args: argparse.Namespace) -> Any:
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    kwargs: dict[str, Any] = {"job": Job(), "num_runs": args.num_runs}
    if hasattr(args, "only_idle"):
        kwargs["only_idle"] = args.only_idle
    return SchedulerJobRunner(**kwargs)


def executors(job_runner: Any) -> list[Any]:
    found = getattr(job_runner, "executors", None)
    if found is None:
        found = [job_runner.job.executor]
    return list(found)


def run_job(job_runner: Any) -> int | None:
    from airflow.jobs.job import run_job as airflow_run_job

    return airflow_run_job(job=job_runner.job, execute_callable=job_runner._execute)


def serves_logs() -> bool:
    """Whether any configured executor wants the scheduler to serve task logs."""
    from airflow.executors.executor_loader import ExecutorLoader

    return any(
        ExecutorLoader.import_executor_cls(name)[0].serve_logs for name in ExecutorLoader.get_executor_names()
    )


def serve_logs_target() -> Callable[[], None]:
    from airflow.utils.serve_logs import serve_logs

    return serve_logs


def health_check_target() -> Callable[[], None]:
    from airflow.utils.scheduler_health import serve_health_check

    return serve_health_check


def migrate_db_command() -> list[str]:
    """The command that creates or upgrades the metadata database."""
    return [sys.executable, "-m", "airflow", "db", "migrate"]


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

    Airflow calls the runner's ``heartbeat_callback`` only once the heartbeat row is committed.
    """
    original = job_runner.heartbeat_callback

    def heartbeat_callback(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        callback()
        return result

    job_runner.heartbeat_callback = heartbeat_callback

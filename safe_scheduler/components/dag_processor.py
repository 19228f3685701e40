"""``airflow dag-processor``: parses DAG files in child processes (standalone on 2.x only).

What differs per Airflow release here: 2.x runs it only with ``[scheduler] standalone_dag_processor``
and not on SQLite; 3.x takes ``--bundle-name``; 2.10+ reloads its settings before it runs; the
manager's arguments.
"""

from __future__ import annotations

import argparse
from typing import Any

from safe_scheduler.base import compat
from safe_scheduler.base.errors import UsageError
from safe_scheduler.components.base import Component, Job


def check(args: argparse.Namespace) -> None:
    """What ``airflow dag-processor`` refuses: on 2.x it runs only standalone, and not on SQLite."""
    from airflow.configuration import conf

    if compat.AIRFLOW_3:
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


def prepare(args: argparse.Namespace) -> None:
    """2.10+: ``airflow dag-processor`` reloads its logging and DB settings before it runs."""
    try:
        from airflow.dag_processing.manager import reload_configuration_for_dag_processing
    except ImportError:
        return
    reload_configuration_for_dag_processing()


def new_job_runner(args: argparse.Namespace) -> Any:
    """A ``DagProcessorJobRunner`` set up as the installed ``airflow dag-processor`` sets it up."""
    from airflow.dag_processing.manager import DagFileProcessorManager
    from airflow.jobs.dag_processor_job_runner import DagProcessorJobRunner
    from airflow.jobs.job import Job

    if compat.AIRFLOW_3:
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


COMPONENT = Component(
    name="dag-processor",
    health_port=8977,
    job=Job(new_job_runner, ("dag_processor", "health_check_threshold"), prepare=prepare),
    check=check,
)

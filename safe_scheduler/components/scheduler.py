"""``airflow scheduler``: the job that schedules and runs tasks through its executors.

What differs per Airflow release here: the runner's arguments (2.x parsed DAGs itself: ``subdir``,
``do_pickle``; 3.2+ has ``--only-idle``), one executor or several (2.10+), where LocalExecutor keeps
its workers, and whether the health-check server has a host setting (not on 2.6).
"""

from __future__ import annotations

import argparse
from typing import Any

from safe_scheduler import compat
from safe_scheduler.component import Component, Server
from safe_scheduler.settings import UsageError


def check(args: argparse.Namespace) -> None:
    if getattr(args, "only_idle", False) and args.num_runs <= 0:
        raise UsageError("--only-idle requires --num-runs to be set to a positive number")


def serves_logs() -> bool:
    """Whether any configured executor wants the scheduler to serve task logs."""
    from airflow.executors.executor_loader import ExecutorLoader

    if not hasattr(ExecutorLoader, "get_executor_names"):  # before 2.10: one executor
        return ExecutorLoader.import_default_executor_cls()[0].serve_logs
    return any(
        ExecutorLoader.import_executor_cls(name)[0].serve_logs for name in ExecutorLoader.get_executor_names()
    )


def log_server_port() -> int:
    """``[logging] worker_log_server_port``, which serve-logs binds on every address."""
    return int(compat.conf_get("logging", "worker_log_server_port", "8793"))


def health_check_enabled() -> bool:
    """``[scheduler] enable_health_check`` (off by default; every supported release has the key)."""
    from airflow.configuration import conf

    return conf.getboolean("scheduler", "enable_health_check")


def health_check_address() -> tuple[str, int]:
    """Where the installed Airflow's scheduler health server binds: 2.6 has no host setting, 0.0.0.0."""
    host = compat.conf_get("scheduler", "scheduler_health_check_server_host", "0.0.0.0")
    return host, int(compat.conf_get("scheduler", "scheduler_health_check_server_port", "8974"))


def health_check_target() -> Any:
    from airflow.utils.scheduler_health import serve_health_check

    return serve_health_check


def servers(args: argparse.Namespace) -> list[Server]:
    found = []
    if not args.skip_serve_logs and serves_logs():
        found.append(Server("serve-logs", compat.serve_logs_target(), "", log_server_port(),
                            "[logging] worker_log_server_port"))
    if health_check_enabled():
        host, port = health_check_address()
        found.append(Server("health-check", health_check_target(), host, port,
                            "[scheduler] scheduler_health_check_server_port"))
    return found


def new_job_runner(args: argparse.Namespace) -> Any:
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

    if not compat.AIRFLOW_3 and hasattr(ExecutorLoader, "validate_database_executor_compatibility"):
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


COMPONENT = Component(
    name="scheduler",
    health_threshold=("scheduler", "scheduler_health_check_threshold"),
    new_job_runner=new_job_runner,
    servers=servers,
    check=check,
    executors=executors,
    task_parents=lambda job_runner: executor_worker_pids(executors(job_runner)),
)

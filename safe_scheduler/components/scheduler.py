"""``airflow scheduler``: the job that schedules and runs tasks through its executors.

What differs per Airflow release here: the runner's arguments (2.x parsed DAGs itself: ``subdir``,
``do_pickle``; 3.2+ has ``--only-idle``), one executor or several (2.10+), where LocalExecutor keeps
its workers, a task's own heartbeat (3.x: the task instance's ``last_heartbeat_at``; 2.x: its
``LocalTaskJob``), and whether the health-check server has a host setting (not on 2.6).

Executor-specific code lives here alone, behind the scheduler's capability (``Executors``): the
bound on ``executor.end()``, the job row kept alive while its tasks finish, the Celery send hold,
and adoption within seconds of a peer's death.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from safe_scheduler.base import compat, output, threads
from safe_scheduler.base.errors import UsageError
from safe_scheduler.components import celery_broker
from safe_scheduler.components.base import Capability, Component, Job, Run, Server, Tasks
from safe_scheduler.components.task_reports import TaskReports, database_gone

log = logging.getLogger("safe_scheduler.scheduler")

#: Seconds between two looks for a peer scheduler whose heartbeat is older than Airflow's
#: ``[scheduler] scheduler_health_check_threshold``: one small query, from the scheduler's loop.
PEER_LOOK = 5.0
#: A dead scheduler's task runs on while its own heartbeat is younger than this many of its intervals.
TASK_BEATS = 2


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
    from airflow.jobs.job import Job as AirflowJob
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    kwargs: dict[str, Any] = {"job": AirflowJob(), "num_runs": args.num_runs}
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


def executor_worker_pids(job_runner: Any) -> set[int]:
    """The processes in which the executors run tasks on this host: each task is a child of one.

    LocalExecutor keeps its workers in ``workers``: a dict by pid from Airflow 3, a list of
    ``QueuedLocalWorker`` in 2.x. With ``parallelism = 0`` Airflow 2 starts one ``LocalWorker`` per
    task and keeps none, so those are found among multiprocessing's children by their class.
    Executors that run tasks elsewhere (Celery, Kubernetes) have none.
    """
    import multiprocessing.process

    pids: set[int] = set()
    for executor in executors(job_runner):
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


class Executors(Capability):
    """The scheduler's executors, wired into the stop.

    * ``end()``, which stock Airflow lets wait for running tasks forever (and Celery's may wait on
      its broker), runs once the tasks are stopped, within what the deadline leaves;
    * meanwhile the job row keeps its heartbeat: the tasks still run under this scheduler, and a
      peer must not reset them while they drain (or, after an unplanned end, finish);
    * CeleryExecutor's sends are held while its Redis broker does not answer (``celery_broker``);
    * a peer scheduler that died is known within ``PEER_LOOK`` of Airflow's own threshold, and its
      task instances are adopted or reset then, not at the next ``orphaned_tasks_check_interval``
      (300 s); LocalExecutor adopts those whose task still heartbeats instead of resetting them
      (they report their own end: resetting them would run them twice).
    """

    def attach(self, job_runner: Any, run: Run) -> None:
        found = executors(job_runner)
        reports = TaskReports()
        if any(type(executor).__name__ == "LocalExecutor" for executor in found):
            reports.hook()  # before executor.start() forks the workers, which then share its word
        for executor in found:
            if hasattr(executor, "_log") and getattr(executor, "log", None) is not None:
                executor._log = _WithoutSignalAgain(executor.log)  # LoggingMixin's cached logger
            executor.end = _end_within_deadline(run, executor.end, job_runner.job, reports)
            celery_broker.hold_sends(executor, run.metrics)
            if type(executor).__name__ == "LocalExecutor":
                executor.try_adopt_task_instances = _adopting_live_tasks(executor.try_adopt_task_instances)
        if found:
            _look_for_dead_peers(found[0], job_runner)


class _WithoutSignalAgain:
    """An executor's logger without LocalExecutor's "waiting for running tasks to finish. Signal
    again if you don't want to wait": that wait is bounded here (``taskstop`` says what it does
    instead), so the line misleads. A stdlib logger on 2.x, structlog's on 3.x: both go through
    here."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def info(self, message: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(message, str) and "Signal again if you don't want to wait" in message:
            return None
        return self._logger.info(message, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def _end_within_deadline(run: Run, end: Any, job: Any, reports: TaskReports) -> Any:
    """``executor.end()`` once the tasks are stopped, given what the deadline leaves, not forever.

    Past that it is left running in its thread (the process is on its way out), and the stop goes
    on: the servers and the final sweep still fit, and the exit code stays the cause's. Where the
    loop is leaving because the database is gone, the tasks' reports are tried once
    (``task_reports``) before the tasks are told to stop.
    """

    @functools.wraps(end)
    def end_within_deadline(*args: Any, **kwargs: Any) -> Any:
        leaving_with = sys.exc_info()[1]  # end() runs in the finally of Airflow's loop: its error, if any
        if database_gone(leaving_with):
            reports.give_up()
            output.in_background(
                log.info, "The database is gone (%s): the tasks' reports of their end are tried once, "
                "not retried", type(leaving_with).__name__,
            )
        run.shutdown.begin("executor shutdown")
        if run.tasks is not None:
            with _JobKeptAlive(job):
                run.tasks.wait()
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["value"] = end(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                result["error"] = exc

        budget = run.shutdown.plan.executor_may_take(run.shutdown.remaining())
        if not output.bounded(budget, call):
            output.in_background(
                log.warning, "executor.end() did not return within %.1fs; going on without it", budget
            )
            return None
        if "error" in result:
            raise result["error"]
        return result.get("value")

    return end_within_deadline


class _JobKeptAlive:
    """The job row's heartbeat while its tasks finish: Airflow's loop, which heartbeats it, is over."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self._done = threading.Event()

    def __enter__(self) -> _JobKeptAlive:
        if getattr(self.job, "id", None) is not None:
            threads.start_daemon("safe-job-beat", self._beat)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()

    def _beat(self) -> None:
        from airflow.jobs.job import Job as AirflowJob
        from airflow.utils.session import create_session

        every = float(getattr(self.job, "heartrate", 5) or 5)
        while not self._done.wait(every):
            try:
                with create_session() as session:
                    session.query(AirflowJob).filter(AirflowJob.id == self.job.id).update(
                        {AirflowJob.latest_heartbeat: datetime.now(timezone.utc)}, synchronize_session=False)
            except Exception as exc:  # noqa: BLE001 - no database: the peers' threshold decides
                output.in_background(log.warning, "Could not keep the job's heartbeat while its tasks "
                                     "finish: %s", type(exc).__name__)
                return


def _look_for_dead_peers(executor: Any, job_runner: Any) -> None:
    """From the scheduler's loop (each executor heartbeat, at most every ``PEER_LOOK``): once a
    peer scheduler's heartbeat is older than Airflow's threshold, adopt or reset its task instances
    now (Airflow's own ``adopt_or_reset_orphaned_tasks``, which never takes a live job's)."""
    from airflow.configuration import conf

    threshold = conf.getint("scheduler", "scheduler_health_check_threshold")
    heartbeat = executor.heartbeat
    last = [time.monotonic()]

    @functools.wraps(heartbeat)
    def heartbeat_and_look(*args: Any, **kwargs: Any) -> Any:
        result = heartbeat(*args, **kwargs)
        if time.monotonic() - last[0] >= PEER_LOOK:
            last[0] = time.monotonic()
            try:
                if _a_peer_died(job_runner.job.id, threshold):
                    log.warning("A scheduler stopped heartbeating %ds ago or more; adopting or resetting "
                                "its task instances now", threshold)
                    job_runner.adopt_or_reset_orphaned_tasks()
            except Exception:  # noqa: BLE001 - Airflow's own timer still adopts, later
                log.warning("Looking for dead schedulers failed", exc_info=True)
        return result

    executor.heartbeat = heartbeat_and_look


def _a_peer_died(own_id: Any, threshold: float) -> bool:
    from airflow.jobs.job import Job as AirflowJob
    from airflow.utils.session import create_session

    limit = datetime.now(timezone.utc) - timedelta(seconds=threshold)
    with create_session() as session:
        return session.query(AirflowJob.id).filter(
            AirflowJob.job_type == "SchedulerJob", AirflowJob.state == "running",
            AirflowJob.latest_heartbeat < limit, AirflowJob.id != own_id,
        ).first() is not None


def _adopting_live_tasks(try_adopt: Any) -> Any:
    """LocalExecutor's ``try_adopt_task_instances``, which resets them all, except those whose task
    still runs: after its scheduler was killed, it finishes and reports its own end."""

    @functools.wraps(try_adopt)
    def try_adopt_task_instances(tis: Any) -> Any:
        to_reset = list(try_adopt(tis))
        live = [ti for ti in to_reset if _outlived_its_scheduler(ti)]
        if live:
            log.warning("Adopting %d task instance(s) of a dead scheduler whose task still runs and "
                        "heartbeats (it reports its own end): %s", len(live), ", ".join(map(repr, live)))
        return [ti for ti in to_reset if ti not in live]

    return try_adopt_task_instances


def _outlived_its_scheduler(ti: Any) -> bool:
    """Whether ``ti``'s task still runs: its own heartbeat is younger than ``TASK_BEATS`` of its
    intervals. Asked once its scheduler's heartbeat is older than Airflow's threshold (30 s), by
    when a task killed with its scheduler (a container's end) has been silent for the threshold less
    the scheduler's heartbeat interval (5 s): 25 s, against 10 s at most for one that runs on."""
    from airflow.configuration import conf
    from airflow.jobs.job import Job as AirflowJob
    from sqlalchemy.orm import object_session

    session = object_session(ti)
    if session is None or str(getattr(ti, "state", "")) not in ("running", "TaskInstanceState.RUNNING"):
        return False
    if hasattr(type(ti), "last_heartbeat_at"):  # 3.x: the supervisor heartbeats the task instance
        interval = conf.getfloat("workers", "min_heartbeat_interval", fallback=5.0)
        last = ti.last_heartbeat_at
    else:  # 2.x: the task's LocalTaskJob heartbeats its own job row
        interval = conf.getfloat("scheduler", "job_heartbeat_sec", fallback=5.0)
        task_job = session.get(AirflowJob, ti.job_id) if ti.job_id else None
        last = task_job.latest_heartbeat if task_job is not None else None
    if last is None:
        return False
    last = last if last.tzinfo is not None else last.replace(tzinfo=timezone.utc)
    return datetime.now(timezone.utc) - last < timedelta(seconds=TASK_BEATS * interval)


COMPONENT = Component(
    name="scheduler",
    health_port=8975,
    job=Job(new_job_runner, ("scheduler", "scheduler_health_check_threshold")),
    servers=servers,
    check=check,
    # The cleanup, on a stop: 10 s to cancel external work (an API call), which leaves the drain
    # 12 s of the default 30 s deadline (budget.derive).
    tasks=Tasks(parents=executor_worker_pids, cleanup=10.0),
    capabilities=(Executors(),),
)

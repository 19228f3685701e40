"""What the core needs to know about a job process, and nothing more.

The core (``runner``, ``cli``, ``shutdown``, ``children``, ``tree``, the watchdogs) runs any
``Component``; each one is a small module in ``components/`` that owns its Airflow code: its job
runner, its servers, its checks and prepare step, and what of these differs between Airflow
releases. ``compat`` keeps only what more than one component needs. A fourth component is one more
file there, plus its name in ``components.NAMES``. A component that is not an Airflow job (the
Celery worker) says how it runs and how it proves progress (``run``, ``on_progress``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def key_of(name: str) -> str:
    """A component's name as a key: module, metric and setting names ("dag-processor" -> "dag_processor")."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class Server:
    """A child process the job keeps for its whole run (serve-logs, a health check)."""

    name: str
    target: Callable[[], Any]
    #: Where it binds, checked free before anything starts; ``key`` names the setting in the refusal.
    host: str
    port: int
    key: str


def _no_executors(job_runner: Any) -> list[Any]:
    return []


def _no_servers(args: argparse.Namespace) -> list[Server]:
    return []


def _no_task_parents(job_runner: Any) -> set[int]:
    return set()


def _run_airflow_job(job_runner: Any) -> Any:
    from safe_scheduler import compat

    return compat.run_job(job_runner)


def _after_each_heartbeat(job_runner: Any, callback: Callable[[], None]) -> None:
    from safe_scheduler import compat

    compat.on_heartbeat(job_runner, callback)


def _nothing(args: argparse.Namespace) -> None:
    return None


@dataclass(frozen=True)
class Component:
    #: The ``airflow`` command it replaces ("scheduler", "triggerer", "dag-processor", "celery-worker"
    #: for ``airflow celery worker``).
    name: str
    #: Airflow's own "unhealthy after" setting for this job; the stall timeout defaults to twice it.
    #: None where Airflow has none (the Celery worker): ``defaults`` then names the stall timeout.
    health_threshold: tuple[str, str] | None
    #: A job runner built as the stock command builds it (for the Celery worker: its worker).
    new_job_runner: Callable[[argparse.Namespace], Any]
    #: Our liveness endpoint's default port: the four can run on one host as they are. Beside
    #: Airflow's own 8793 (worker logs), 8794 (trigger logs) and 8974 (scheduler health check).
    health_port: int = 8975
    #: Where this component's defaults differ from ``settings.DEFAULTS`` (the worker's drain).
    defaults: dict[str, float] = field(default_factory=dict)
    #: Runs the job runner in this thread until it ends: an Airflow job, by default.
    run: Callable[[Any], Any] = _run_airflow_job
    #: Calls ``callback`` in the job's own thread each time it proves it works: after each committed
    #: job heartbeat, by default. The stall watchdog and the endpoint count from these.
    on_progress: Callable[[Any, Callable[[], None]], None] = _after_each_heartbeat
    #: The servers to run beside the job, for these flags and this config.
    servers: Callable[[argparse.Namespace], list[Server]] = _no_servers
    #: Refuse what the stock command refuses, as a ``UsageError`` (one line, exit 2); runs before
    #: the database is checked, so it looks at flags and config only.
    check: Callable[[argparse.Namespace], None] = _nothing
    #: What the stock command does in-process before its job (secrets masking, config reloads).
    prepare: Callable[[argparse.Namespace], None] = _nothing
    #: The executors whose ``end()`` is bounded on every way out (the scheduler's).
    executors: Callable[[Any], list[Any]] = _no_executors
    #: The processes that run tasks on this host, given the job runner: each task is a child of one
    #: (a LocalExecutor's workers, a Celery pool's processes). Their tasks are stopped first.
    task_parents: Callable[[Any], set[int]] = _no_task_parents
    #: The daemon's process name in pid and log file names (``airflow celery worker``: "worker").
    process_name: str = ""
    #: Signals that mean "stop now" once a stop has begun: the drain ends and tasks get SIGTERM at
    #: once (Celery's cold shutdown is SIGQUIT). A second SIGTERM or SIGINT always means it.
    hurry_signals: tuple[str, ...] = ()
    #: Raises ``dbwait.BrokerUnreachable`` while the broker does not answer, ``UsageError`` if it
    #: answers wrong: checked, and waited for, at start like the metadata database (the worker).
    check_broker: Callable[[argparse.Namespace], None] | None = None
    #: What to try once when the stall timeout passes, before the stop: it returns what it did, and
    #: the stop follows only if another ``stall_timeout`` passes without progress (the worker
    #: reconnects to its broker). None: stop at once.
    recover: Callable[[Any], str] | None = None
    #: What the stall watchdog waits for, in the words of ``--help`` and the log.
    progress: str = "successful heartbeat"
    #: The stock command's ``ActionCommand`` (its flags, its epilog), where it is not a core
    #: ``airflow <name>`` command (``airflow celery worker`` comes from the Celery provider).
    find_command: Callable[[], Any] | None = None
    #: The stock command's words after ``airflow``, where they are not the name.
    stock_words: tuple[str, ...] = ()
    #: More keyword arguments to Airflow's ``run_command_with_daemon_option`` (the worker's umask).
    daemon_options: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}

    @property
    def runs_tasks(self) -> bool:
        """Whether tasks run below it, which get the drain and cleanup time (flags, settings)."""
        return self.task_parents is not _no_task_parents

    @property
    def drains_by_default(self) -> bool:
        """Whether its tasks get a fixed cleanup time and the drain the rest of the deadline (the
        worker), rather than no drain and the rest for the cleanup (``settings.load``, the flags)."""
        return "task_cleanup_timeout" in self.defaults

    @property
    def prog(self) -> str:
        return f"airflow-safe-{self.name}"

    @property
    def stock(self) -> str:
        """The stock command this one replaces ("airflow celery worker")."""
        return "airflow " + " ".join(self.stock_words or (self.name,))

    def airflow_command(self) -> Any:
        """The stock command's definition in the installed Airflow: its flags become ours."""
        if self.find_command is not None:
            return self.find_command()
        from safe_scheduler import compat

        return compat.cli_command(self.name)

    @property
    def daemon_name(self) -> str:
        """The process name of ``-D``'s pid and log files, as the stock command names them."""
        return self.process_name or self.name

    @property
    def key(self) -> str:
        """The name in module, metric and setting names ("dag_processor")."""
        return key_of(self.name)

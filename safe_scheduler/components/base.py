"""What the core needs to know about a job process, and nothing more.

A component declares what it is (its name, its endpoint's port, how its process runs and proves
that it works, its servers, what it refuses) and plugs in what only some components have as
objects of their own: tasks that run below it (``Tasks``), and capabilities the core hands the run
to (``Capability``: the scheduler's executors, the worker's broker). The core (``core.runner``)
runs any of them and knows none by name. A new component is one file in ``components/`` and its
console script in ``pyproject.toml``; the registry is that list (``components.names``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safe_scheduler.base.metrics import Metrics
    from safe_scheduler.liveness.stall import StallWatchdog
    from safe_scheduler.shutdown.owner import Shutdown
    from safe_scheduler.shutdown.taskstop import TaskStop


def key_of(name: str) -> str:
    """A component's name as a key: module, metric and setting names ("dag-processor" -> "dag_processor")."""
    return name.replace("-", "_")


def name_of(key: str) -> str:
    """The reverse of ``key_of``: every component's name uses dashes, never underscores."""
    return key.replace("_", "-")


@dataclass(frozen=True)
class Server:
    """A child process the job keeps for its whole run (serve-logs, a health check)."""

    name: str
    target: Callable[[], Any]
    #: Where it binds, checked free before anything starts; ``key`` names the setting in the refusal.
    #: A server that binds nothing has port 0.
    host: str
    port: int
    key: str


@dataclass
class Run:
    """What the core hands to a component's capabilities once its job runner exists."""

    shutdown: Shutdown
    stall: StallWatchdog
    metrics: Metrics
    #: The stop of the tasks that run below the job; None where none do.
    tasks: TaskStop | None
    #: What the liveness endpoint adds to its body: callables that answer from memory, a dict each.
    notes: list[Callable[[], dict[str, Any]]]


class Capability:
    """Something a component plugs into the core; each hook does nothing unless overridden."""

    #: What ``awaited`` waits for at start, in the words of ``--help`` ("a Celery broker"); "" if nothing.
    waits_for = ""

    def awaited(self, args: argparse.Namespace) -> list[tuple[str, Callable[[], None]]]:
        """Services checked before anything starts, and waited for while they do not answer
        (``errors.Unreachable``): (what, check) pairs, as the metadata database is."""
        return []

    def attach(self, job_runner: Any, run: Run) -> None:
        """Wire into the run once the job runner exists, before it starts."""


@dataclass(frozen=True)
class Tasks:
    """Tasks run below the job: a drain and a cleanup time of their own (flags, settings), and the
    stop that gives them (``taskstop``)."""

    #: The processes that run tasks on this host, given the job runner: each task is a child of one
    #: (a LocalExecutor's workers, a Celery pool's processes).
    parents: Callable[[Any], set[int]]
    #: Seconds for ``on_kill`` and ``on_termination`` between SIGTERM and SIGKILL, by default; the
    #: drain gets what the deadline leaves after it (``budget.derive``).
    cleanup: float


class Job:
    """How a component's process runs and proves that it works: an Airflow job (a job row that
    heartbeats), as ``airflow <name>`` builds it. The Celery worker, which is not one, brings its own
    (``celery_worker.WorkerJob``)."""

    #: What a sign of progress is, in the words of ``--help`` and the log.
    progress = "successful heartbeat"
    #: Signals that mean "stop now" once a stop has begun (Celery's cold shutdown is SIGQUIT). A
    #: second SIGTERM or SIGINT always means it.
    hurry_signals: tuple[str, ...] = ()

    def __init__(self, new_runner: Callable[[argparse.Namespace], Any], health_threshold: tuple[str, str] | None,
                 prepare: Callable[[argparse.Namespace], None] | None = None, stall_timeout: float = 60.0) -> None:
        #: A job runner built as the stock command builds it.
        self.new_runner = new_runner
        #: Airflow's own "unhealthy after" setting for this job; the stall timeout defaults to twice it.
        #: None for a process that is no Airflow job (the worker, the api-server): Airflow has no
        #: threshold for it, and ``stall_timeout`` is its default.
        self.health_threshold = health_threshold
        self.stall_timeout = stall_timeout
        self._prepare = prepare

    def stock_words(self, name: str) -> tuple[str, ...]:
        """The stock command's words after ``airflow``."""
        return (name,)

    def airflow_command(self, name: str) -> Any:
        """The stock command's definition in the installed Airflow: its flags become ours."""
        from safe_scheduler.base import compat

        return compat.cli_command(name)

    def defaults(self) -> dict[str, float]:
        """Our settings whose default differs for this job (the worker's longer deadline)."""
        return {}

    def stall_default(self, conf: Any) -> tuple[Any, str, float, str]:
        """The stall timeout's default: (a number of seconds as configured, its name, the factor it
        is taken by, the words of ``--help``). A job is unhealthy after Airflow's threshold; it is
        declared hung after twice that, so a slow loop a probe tolerates is not killed."""
        if self.health_threshold is None:
            return self.stall_timeout, "the stall timeout's default", 1.0, f"{self.stall_timeout:g}"
        section, option = self.health_threshold
        return (conf.get(section, option, fallback=30), f"[{section}] {option}", 2.0,
                f"twice [{section}] {option}")

    def prepare(self, args: argparse.Namespace) -> None:
        """What the stock command does in-process before its job (secrets masking, config reloads)."""
        if self._prepare is not None:
            self._prepare(args)

    def run(self, job_runner: Any) -> Any:
        """Run the job in this thread until it ends."""
        from safe_scheduler.base import compat

        return compat.run_job(job_runner)

    def on_progress(self, job_runner: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the job's own thread each time it proves it works: after each
        committed job heartbeat. The stall watchdog and the endpoint count from these."""
        from safe_scheduler.base import compat

        compat.on_heartbeat(job_runner, callback)

    def daemon_name(self, name: str) -> str:
        """The process name of ``-D``'s pid and log files, as the stock command names them."""
        return self.stock_words(name)[-1]

    def daemon_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """More keyword arguments to Airflow's ``run_command_with_daemon_option``."""
        return {}


def _no_servers(args: argparse.Namespace) -> list[Server]:
    return []


def _nothing(args: argparse.Namespace) -> None:
    return None


@dataclass(frozen=True)
class Component:
    #: The ``airflow`` command it replaces ("scheduler"; "celery-worker" for ``airflow celery worker``).
    name: str
    #: Our liveness endpoint's default port: the components run side by side on one host as they
    #: are. Beside Airflow's own 8793 (worker logs), 8794 (trigger logs), 8974 (its health check).
    health_port: int
    #: How its process runs and proves that it works.
    job: Job
    #: The servers to run beside the job, for these flags and this config.
    servers: Callable[[argparse.Namespace], list[Server]] = _no_servers
    #: Refuse what the stock command refuses, as a ``UsageError`` (one line, exit 2); runs before
    #: the database is checked, so it looks at flags and config only.
    check: Callable[[argparse.Namespace], None] = _nothing
    #: Tasks that run below it; None where none do.
    tasks: Tasks | None = None
    #: What it plugs into the run: the scheduler's executors, the worker's broker.
    capabilities: tuple[Capability, ...] = ()

    @property
    def key(self) -> str:
        """The name in module, metric and setting names ("dag_processor")."""
        return key_of(self.name)

    @property
    def prog(self) -> str:
        return f"airflow-safe-{self.name}"

    @property
    def stock(self) -> str:
        """The stock command this one replaces ("airflow celery worker")."""
        return "airflow " + " ".join(self.job.stock_words(self.name))

    @property
    def daemon_name(self) -> str:
        """The process name of ``-D``'s pid and log files, as the stock command names them."""
        return self.job.daemon_name(self.name)

    def airflow_command(self) -> Any:
        return self.job.airflow_command(self.name)

"""What the core needs to know about a job process, and nothing more.

The core (``runner``, ``cli``, ``shutdown``, ``children``, ``tree``, the watchdogs) runs any
``Component``; each one is a small module in ``components/`` that owns its Airflow code: its job
runner, its servers, its checks and prepare step, and what of these differs between Airflow
releases. ``compat`` keeps only what more than one component needs. A fourth component is one more
file there, plus its name in ``components.NAMES``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
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


def _no_worker_pids(executors: list[Any]) -> set[int]:
    return set()


def _nothing(args: argparse.Namespace) -> None:
    return None


@dataclass(frozen=True)
class Component:
    #: The ``airflow`` command it replaces ("scheduler", "triggerer", "dag-processor").
    name: str
    #: Airflow's own "unhealthy after" setting for this job; the stall timeout defaults to twice it.
    health_threshold: tuple[str, str]
    #: A job runner built as the stock command builds it.
    new_job_runner: Callable[[argparse.Namespace], Any]
    #: Our liveness endpoint's default port: the three can run on one host as they are. Beside
    #: Airflow's own 8793 (worker logs), 8794 (trigger logs) and 8974 (scheduler health check).
    health_port: int = 8975
    #: The servers to run beside the job, for these flags and this config.
    servers: Callable[[argparse.Namespace], list[Server]] = _no_servers
    #: Refuse what the stock command refuses, as a ``UsageError`` (one line, exit 2); runs before
    #: the database is checked, so it looks at flags and config only.
    check: Callable[[argparse.Namespace], None] = _nothing
    #: What the stock command does in-process before its job (secrets masking, config reloads).
    prepare: Callable[[argparse.Namespace], None] = _nothing
    #: The executors whose running tasks are stopped first on every way out (the scheduler's).
    executors: Callable[[Any], list[Any]] = _no_executors
    #: The processes of those executors that run tasks on this host: each task is a child of one.
    executor_worker_pids: Callable[[list[Any]], set[int]] = _no_worker_pids

    @property
    def runs_tasks(self) -> bool:
        """Whether it has executors, whose tasks get the drain and cleanup time (flags, settings)."""
        return self.executors is not _no_executors

    @property
    def prog(self) -> str:
        return f"airflow-safe-{self.name}"

    @property
    def key(self) -> str:
        """The name in module, metric and setting names ("dag_processor")."""
        return key_of(self.name)

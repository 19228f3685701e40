"""The ``[safe_scheduler]`` settings: read from Airflow's config, overridden by CLI flags, validated
once, and handed down (the parent gets its part from the job: ``Parent.tell``).

Validation happens before anything starts, so a typo in an environment variable ends the command
with one line on stderr and exit code 2 instead of a process that runs with a surprise deadline.
The stop's numbers are checked by the time plan the stop itself spends (``shutdown.budget``): a
config is accepted only if the stop will honour every number in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from safe_scheduler.base.errors import UsageError
from safe_scheduler.components.base import Component, key_of
from safe_scheduler.shutdown import budget
from safe_scheduler.shutdown.budget import TimePlan

SECTION = "safe_scheduler"

#: Our settings in seconds, each with its flag, and their defaults: written here only (a
#: component's job may change one: the worker's deadline). None: derived when loaded (``load``).
SECONDS: dict[str, float | None] = {
    "shutdown_timeout": 30.0,
    "child_stop_timeout": 5.0,
    "stall_timeout": None,  # the job's own: twice Airflow's threshold (``Job.stall_default``)
    "task_drain_timeout": None,  # what the deadline leaves the tasks after their cleanup
    "task_cleanup_timeout": None,  # the component's (``Tasks.cleanup``), or what the deadline leaves
    "orphaned_task_timeout": None,  # shutdown_timeout: what a supervisor's stop budget gives anyway
    "db_wait_timeout": 600.0,
}
#: Our other settings, config only, and their defaults.
OTHERS: dict[str, Any] = {
    "db_timeouts": True,
    "enable_health_check": True,
    # The kubelet probes the pod's IP, from the node: not loopback in Kubernetes.
    "health_check_server_host": "0.0.0.0",
}
#: The settings that only components with tasks below them take.
TASK_KEYS = ("task_drain_timeout", "task_cleanup_timeout", "orphaned_task_timeout")


@dataclass(frozen=True)
class Settings:
    #: Seconds from "shutdown started" to "process gone", whatever blocks the way.
    shutdown_timeout: float
    #: Seconds a child gets between SIGTERM and SIGKILL of its whole process tree.
    child_stop_timeout: float
    #: Seconds without progress (a heartbeat) after which the job counts as hung; 0: never.
    stall_timeout: float
    #: Seconds running tasks get to finish on their own once shutdown starts, before SIGTERM.
    task_drain_timeout: float
    #: Seconds tasks get between SIGTERM and SIGKILL for ``on_kill`` / ``on_termination``.
    task_cleanup_timeout: float
    #: Seconds running tasks go on, to finish and report their own state, after an unplanned end
    #: (the parent or the job killed), before they are stopped.
    orphaned_task_timeout: float
    #: Seconds to wait at start for a metadata database that does not answer (``dbwait``); 0: refuse
    #: at once. 600: the kubelet forgets a container's restart back-off once its run and the wait
    #: before it add up to more than 10 minutes (twice its 300 s maximum), so a pod that waits this
    #: long through an outage is, at worst, started again 10 s later, never 300 s.
    db_wait_timeout: float
    #: Add connect timeouts and TCP keepalives to metadata DB connections that have none.
    db_timeouts: bool
    #: Our liveness endpoint (``healthserver``): on or off, where it binds, and after how many
    #: seconds without progress it answers 503 (the stall timeout, else its default).
    enable_health_check: bool
    health_check_server_host: str
    health_check_server_port: int
    unhealthy_after: float

    @property
    def plan(self) -> TimePlan:
        """The stop's time plan, from these numbers."""
        return TimePlan(self.shutdown_timeout, self.child_stop_timeout, self.task_drain_timeout,
                        self.task_cleanup_timeout, self.orphaned_task_timeout)


def defaults(component: Component) -> dict[str, float | None]:
    """``SECONDS`` as ``component`` has them."""
    return {**SECONDS, **component.job.defaults()}


def default_words(component: Component, key: str, conf: Any = None) -> str:
    """The default of ``key`` for ``component``, in the words of ``--help``."""
    value = defaults(component)[key]
    if value is not None:
        return f"{value:g}"
    if key == "stall_timeout":
        return component.job.stall_default(conf)[3]
    if key == "task_drain_timeout":
        return "what --shutdown-timeout leaves the tasks after their cleanup"
    if key == "task_cleanup_timeout":
        cleanup = component.tasks.cleanup if component.tasks else 0.0
        return f"{cleanup:g} (less, if the deadline leaves less)"
    return "the --shutdown-timeout"  # orphaned_task_timeout


def _seconds(raw: object, name: str, *, allow_zero: bool) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds, got {raw!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise UsageError(f"{name} must be a finite number of seconds, got {raw!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise UsageError(f"{name} must be {bound} seconds, got {raw!r}")
    return value


def _boolean(raw: object, name: str) -> bool:
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UsageError(f"{name} must be True or False, got {raw!r}")


def health_port_key(component: str) -> str:
    """The ``[safe_scheduler]`` key of ``component``'s liveness endpoint port."""
    return f"{key_of(component)}_health_check_server_port"


def _port(raw: object, name: str) -> int:
    try:
        port = int(str(raw).strip())
    except ValueError:
        raise UsageError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"{name} must be a port number from 1 to 65535, got {raw!r}")
    return port


def _setting(conf: Any, key: str) -> str | None:
    raw = conf.get(SECTION, key, fallback=None)
    return None if raw is None or str(raw).strip() == "" else str(raw).strip()


def flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


def load(cli_overrides: dict[str, str | None], conf: Any, component: Component) -> Settings:
    """Merge ``[safe_scheduler]`` from Airflow's ``conf`` with CLI overrides and validate, once.

    ``conf`` is Airflow's config object (passed in so this module stays importable without Airflow,
    which keeps its unit tests fast). Env vars ``AIRFLOW__SAFE_SCHEDULER__*`` come through ``conf``.
    """
    given: dict[str, float] = {}
    for key in SECONDS:
        cli_value = cli_overrides.get(key)
        raw, name = (cli_value, flag_of(key)) if cli_value is not None else (_setting(conf, key), f"[{SECTION}] {key}")
        if raw is not None:
            given[key] = _seconds(raw, name, allow_zero=(key != "shutdown_timeout"))
    values = {key: value for key, value in defaults(component).items() if value is not None}
    values.update(given)
    shutdown_timeout, child_stop_timeout = values["shutdown_timeout"], values["child_stop_timeout"]
    budget.check_children(shutdown_timeout, child_stop_timeout)
    raw, name, factor, _ = component.job.stall_default(conf)
    derived_stall = factor * _seconds(raw, name, allow_zero=False)
    values.setdefault("stall_timeout", derived_stall)
    if component.tasks is not None:
        values["task_drain_timeout"], values["task_cleanup_timeout"] = budget.derive(
            shutdown_timeout, child_stop_timeout, given.get("task_drain_timeout"),
            given.get("task_cleanup_timeout"), component.tasks.cleanup,
        )
        values.setdefault("orphaned_task_timeout", shutdown_timeout)
    else:
        values.update({key: 0.0 for key in TASK_KEYS})
    port_key = health_port_key(component.name)
    port = _setting(conf, port_key)
    switches = {key: _setting(conf, key) for key in ("db_timeouts", "enable_health_check")}
    return Settings(
        **values,
        **{key: OTHERS[key] if raw is None else _boolean(raw, f"[{SECTION}] {key}") for key, raw in switches.items()},
        health_check_server_host=_setting(conf, "health_check_server_host") or OTHERS["health_check_server_host"],
        health_check_server_port=component.health_port if port is None else _port(port, f"[{SECTION}] {port_key}"),
        # With the stall watchdog off, the endpoint still needs a bound: the default one.
        unhealthy_after=values["stall_timeout"] or derived_stall,
    )

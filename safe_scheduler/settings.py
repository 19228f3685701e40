"""The ``[safe_scheduler]`` settings: read from Airflow's config, overridden by CLI flags, validated.

Validation happens before anything starts, so a typo in an environment variable ends the command
with one line on stderr and exit code 2 instead of a scheduler that runs with a surprise deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from safe_scheduler.component import Component, key_of

SECTION = "safe_scheduler"

#: key -> default, in seconds; stall_timeout's default (None) is derived from the health check.
DEFAULTS: dict[str, float | None] = {
    "shutdown_timeout": 30.0,
    "child_stop_timeout": 5.0,
    "stall_timeout": None,
    "task_drain_timeout": 0.0,
    "task_cleanup_timeout": None,
    "db_wait_timeout": 600.0,
}
#: A scheduler is unhealthy after ``[scheduler] scheduler_health_check_threshold`` seconds without
#: a heartbeat; it is declared hung after twice that, so a slow loop a probe tolerates is not killed.
STALL_FACTOR = 2
#: Seconds of what the deadline leaves that every stop keeps for SIGKILL and reaping after its polite
#: wait (``tree.stop``). A shutdown pays it twice: once after the tasks, once after the servers.
KILL_RESERVE = 1.0


class UsageError(Exception):
    """A problem with how the command was invoked or configured; the message is one line."""


@dataclass(frozen=True)
class Settings:
    #: Seconds from "shutdown started" to "process gone", whatever blocks the way.
    shutdown_timeout: float
    #: Seconds a child gets between SIGTERM and SIGKILL of its whole process tree.
    child_stop_timeout: float
    #: Seconds without a successful heartbeat after which the scheduler counts as hung; 0: never.
    stall_timeout: float = 0.0
    #: Add connect timeouts and TCP keepalives to metadata DB connections that have none.
    db_timeouts: bool = True
    #: Seconds running tasks get to finish on their own once shutdown starts, before SIGTERM.
    task_drain_timeout: float = 0.0
    #: Seconds tasks get between SIGTERM and SIGKILL for ``on_kill`` / ``on_termination``.
    task_cleanup_timeout: float = 0.0
    #: Seconds to wait at start for a metadata database that does not answer (``dbwait``); 0: refuse
    #: at once. 600: the kubelet forgets a container's restart back-off once its run and the wait
    #: before it add up to more than 10 minutes (twice its 300 s maximum), so a pod that waits this
    #: long through an outage is, at worst, started again 10 s later, never 300 s.
    db_wait_timeout: float = 600.0
    #: Our liveness endpoint (``healthserver``): on or off, where it binds, and after how many
    #: seconds without a heartbeat it answers 503 (the stall timeout, else twice Airflow's threshold).
    enable_health_check: bool = True
    health_check_server_host: str = "0.0.0.0"
    health_check_server_port: int = 8975
    unhealthy_after: float = 60.0

    @property
    def after_tasks(self) -> float:
        """Seconds of the deadline that must be left once the tasks are stopped: the servers' stop
        (``child_stop_timeout``) and the kill of whatever is left after it."""
        return self.child_stop_timeout + KILL_RESERVE


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


def _setting(conf, key: str) -> str | None:
    raw = conf.get(SECTION, key, fallback=None)
    return None if raw is None or str(raw).strip() == "" else str(raw).strip()


def load(cli_overrides: dict[str, str | None], conf, component: Component) -> Settings:
    """Merge ``[safe_scheduler]`` from Airflow's ``conf`` with CLI overrides and validate, once:
    the result is handed down to every layer (``Parent.tell`` passes its part to the parent).

    ``conf`` is Airflow's config object (passed in so this module stays importable without Airflow,
    which keeps its unit tests fast). Env vars ``AIRFLOW__SAFE_SCHEDULER__*`` come through ``conf``.
    ``component`` gives the health threshold the stall timeout derives from and the endpoint's port.
    """
    if component.health_threshold is not None:
        section, option = component.health_threshold
        threshold = conf.get(section, option, fallback=30)
        derived_stall = STALL_FACTOR * _seconds(threshold, f"[{section}] {option}", allow_zero=False)
    else:  # no threshold of Airflow's to derive from: the component names its own
        derived_stall = float(component.defaults["stall_timeout"])
    values: dict[str, float] = {}
    explicit: set[str] = set()
    for key, default in {**DEFAULTS, **component.defaults}.items():
        cli_value = cli_overrides.get(key)
        if cli_value is not None:
            raw, name = cli_value, "--" + key.replace("_", "-")
            explicit.add(key)
        else:
            raw = _setting(conf, key)
            if raw is not None:
                explicit.add(key)
            raw = default if raw is None else raw
            name = f"[{SECTION}] {key}"
        if key == "task_cleanup_timeout" and raw is None:
            continue  # derived below, from what the other timeouts leave
        if raw is None:  # stall_timeout: derived from Airflow's own notion of "unhealthy" for this job
            raw = derived_stall
        values[key] = _seconds(raw, name, allow_zero=(key != "shutdown_timeout"))
    if values["child_stop_timeout"] > values["shutdown_timeout"]:
        raise UsageError(
            f"child_stop_timeout ({values['child_stop_timeout']:g}s) must not exceed "
            f"shutdown_timeout ({values['shutdown_timeout']:g}s): children are stopped within the "
            "shutdown deadline"
        )
    if component.drains_by_default:
        # A component that drains by default (the worker): its tasks' cleanup time is fixed, and the
        # drain is whatever the deadline leaves after it; where the user set one of the two, the
        # other fits in what is left. So any shutdown_timeout works without the other two to match.
        room = max(0.0, values["shutdown_timeout"] - values["child_stop_timeout"] - 2 * KILL_RESERVE)
        if "task_drain_timeout" not in explicit:
            if "task_cleanup_timeout" not in explicit:
                values["task_cleanup_timeout"] = min(values["task_cleanup_timeout"], room)
            values["task_drain_timeout"] = max(0.0, room - values["task_cleanup_timeout"])
        elif "task_cleanup_timeout" not in explicit:
            values["task_cleanup_timeout"] = min(values["task_cleanup_timeout"],
                                                 max(0.0, room - values["task_drain_timeout"]))
    leaves = values["shutdown_timeout"] - values["task_drain_timeout"] - values["child_stop_timeout"]
    # Not set: everything the deadline leaves once the drain, the servers' stop and the two kills are paid.
    values.setdefault("task_cleanup_timeout", max(0.0, leaves - 2 * KILL_RESERVE))
    if values["task_cleanup_timeout"] > leaves or leaves < 0:
        raise UsageError(
            f"task_drain_timeout ({values['task_drain_timeout']:g}s) + task_cleanup_timeout "
            f"({values['task_cleanup_timeout']:g}s) + child_stop_timeout ({values['child_stop_timeout']:g}s) "
            f"must not exceed shutdown_timeout ({values['shutdown_timeout']:g}s): tasks and children are "
            "stopped within the shutdown deadline"
        )
    db_timeouts = _setting(conf, "db_timeouts")
    enable_health_check = _setting(conf, "enable_health_check")
    port_key = health_port_key(component.name)
    port = _setting(conf, port_key)
    return Settings(
        **values,
        db_timeouts=True if db_timeouts is None else _boolean(db_timeouts, f"[{SECTION}] db_timeouts"),
        enable_health_check=(
            True if enable_health_check is None
            else _boolean(enable_health_check, f"[{SECTION}] enable_health_check")
        ),
        health_check_server_host=_setting(conf, "health_check_server_host") or "0.0.0.0",
        health_check_server_port=component.health_port if port is None else _port(port, f"[{SECTION}] {port_key}"),
        # With the stall watchdog off, the endpoint still needs a bound: the default one.
        unhealthy_after=values["stall_timeout"] or derived_stall,
    )

"""The ``[safe_scheduler]`` settings: read from Airflow's config, overridden by CLI flags, validated.

Validation happens before anything starts, so a typo in an environment variable ends the command
with one line on stderr and exit code 2 instead of a scheduler that runs with a surprise deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SECTION = "safe_scheduler"

#: key -> default, in seconds
DEFAULTS: dict[str, float] = {
    "shutdown_timeout": 30.0,
    "child_stop_timeout": 5.0,
}


class UsageError(Exception):
    """A problem with how the command was invoked or configured; the message is one line."""


@dataclass(frozen=True)
class Settings:
    #: Seconds from "shutdown started" to "process gone", whatever blocks the way.
    shutdown_timeout: float
    #: Seconds a child gets between SIGTERM and SIGKILL of its whole process tree.
    child_stop_timeout: float


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


def load(cli_overrides: dict[str, str | None], conf) -> Settings:
    """Merge ``[safe_scheduler]`` from Airflow's ``conf`` with CLI overrides and validate.

    ``conf`` is Airflow's config object (passed in so this module stays importable without Airflow,
    which keeps its unit tests fast). Env vars ``AIRFLOW__SAFE_SCHEDULER__*`` come through ``conf``.
    """
    values: dict[str, float] = {}
    for key, default in DEFAULTS.items():
        cli_value = cli_overrides.get(key)
        if cli_value is not None:
            raw, name = cli_value, "--" + key.replace("_", "-")
        else:
            raw = conf.get(SECTION, key, fallback=None)
            raw = default if raw is None or str(raw).strip() == "" else raw
            name = f"[{SECTION}] {key}"
        values[key] = _seconds(raw, name, allow_zero=(key == "child_stop_timeout"))
    if values["child_stop_timeout"] > values["shutdown_timeout"]:
        raise UsageError(
            f"child_stop_timeout ({values['child_stop_timeout']:g}s) must not exceed "
            f"shutdown_timeout ({values['shutdown_timeout']:g}s): children are stopped within the "
            "shutdown deadline"
        )
    return Settings(**values)

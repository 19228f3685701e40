"""Our metrics, sent through Airflow's own Stats (statsd or OpenTelemetry, as the user configured).

Names are ``safe_<component>.<name>`` under the user's ``[metrics]`` prefix (``safe_scheduler.stalls``,
``safe_triggerer.stalls``, ``safe_dag_processor.stalls``), so that a dashboard tells the three apart.
Emitting a metric must never be the thing that breaks a shutdown, so every call swallows its own
errors.
"""

from __future__ import annotations

import logging

log = logging.getLogger("safe_scheduler.metrics")

PREFIX = "safe_scheduler."


def use_component(name: str) -> None:
    """Name every metric from now on after ``name`` ("dag-processor" -> ``safe_dag_processor.``)."""
    global PREFIX
    PREFIX = "safe_" + name.replace("-", "_") + "."


def _emit(kind: str, name: str, value: float) -> None:
    try:
        from safe_scheduler import compat

        getattr(compat.stats(), kind)(PREFIX + name, value)
    except Exception:  # noqa: BLE001
        log.debug("could not emit %s", name, exc_info=True)


def incr(name: str, count: int = 1) -> None:
    _emit("incr", name, count)


def gauge(name: str, value: float) -> None:
    _emit("gauge", name, value)


def timing(name: str, seconds: float) -> None:
    _emit("timing", name, seconds * 1000.0)

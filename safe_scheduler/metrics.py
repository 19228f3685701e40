"""Our metrics, sent through Airflow's own Stats (statsd or OpenTelemetry, as the user configured).

Names are ``safe_scheduler.<name>`` under the user's ``[metrics]`` prefix. Emitting a metric must
never be the thing that breaks a shutdown, so every call swallows its own errors.
"""

from __future__ import annotations

import logging

log = logging.getLogger("safe_scheduler.metrics")

PREFIX = "safe_scheduler."


def _backend():
    from safe_scheduler import compat

    return compat.stats()


def incr(name: str, count: int = 1) -> None:
    try:
        _backend().incr(PREFIX + name, count)
    except Exception:  # noqa: BLE001
        log.debug("could not emit %s", name, exc_info=True)


def gauge(name: str, value: float) -> None:
    try:
        _backend().gauge(PREFIX + name, value)
    except Exception:  # noqa: BLE001
        log.debug("could not emit %s", name, exc_info=True)


def timing(name: str, seconds: float) -> None:
    try:
        _backend().timing(PREFIX + name, seconds * 1000.0)
    except Exception:  # noqa: BLE001
        log.debug("could not emit %s", name, exc_info=True)

"""Our metrics, sent through Airflow's own Stats (statsd or OpenTelemetry, as the user configured).

Names are ``safe_<component>.<name>`` under the user's ``[metrics]`` prefix (``safe_scheduler.stalls``,
``safe_triggerer.stalls``, ``safe_dag_processor.stalls``), so that a dashboard tells the three apart.
Emitting a metric must never be the thing that breaks a shutdown, so every call swallows its own
errors.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("safe_scheduler.base.metrics")


def configured() -> bool:
    """Whether the user sends Airflow's metrics anywhere (``[metrics] statsd_on`` or ``otel_on``).
    True where that cannot be read, or Airflow is not imported yet (its import is not ours to start
    here): a gauge too many costs less than one missing."""
    if "airflow.configuration" not in sys.modules:
        return True
    try:
        from airflow.configuration import conf

        return any(conf.getboolean("metrics", key, fallback=False) for key in ("statsd_on", "otel_on"))
    except Exception:  # noqa: BLE001
        return True


class Metrics:
    """The metrics of one component; made once by the runner and handed to whoever counts."""

    def __init__(self, key: str = "scheduler", on: bool | None = None) -> None:
        #: "scheduler", "triggerer", "dag_processor" (``settings.key_of``).
        self.prefix = f"safe_{key}."
        #: Whether anything receives them: a gauge sent every second is worth a wake-up only then.
        self.on = configured() if on is None else on

    def _emit(self, kind: str, name: str, value: float) -> None:
        if not self.on:  # Airflow's own Stats would drop it too
            return
        try:
            from safe_scheduler.base import compat

            getattr(compat.stats(), kind)(self.prefix + name, value)
        except Exception:  # noqa: BLE001
            log.debug("could not emit %s", name, exc_info=True)

    def incr(self, name: str, count: int = 1) -> None:
        self._emit("incr", name, count)

    def gauge(self, name: str, value: float) -> None:
        self._emit("gauge", name, value)

    def timing(self, name: str, seconds: float) -> None:
        self._emit("timing", name, seconds * 1000.0)

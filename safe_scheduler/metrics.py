"""Our metrics, sent through Airflow's own Stats (statsd or OpenTelemetry, as the user configured).

Names are ``safe_<component>.<name>`` under the user's ``[metrics]`` prefix (``safe_scheduler.stalls``,
``safe_triggerer.stalls``, ``safe_dag_processor.stalls``), so that a dashboard tells the three apart.
Emitting a metric must never be the thing that breaks a shutdown, so every call swallows its own
errors.
"""

from __future__ import annotations

import logging

log = logging.getLogger("safe_scheduler.metrics")


class Metrics:
    """The metrics of one component; made once by the runner and handed to whoever counts."""

    def __init__(self, key: str = "scheduler") -> None:
        #: "scheduler", "triggerer", "dag_processor" (``settings.key_of``).
        self.prefix = f"safe_{key}."

    def _emit(self, kind: str, name: str, value: float) -> None:
        try:
            from safe_scheduler import compat

            getattr(compat.stats(), kind)(self.prefix + name, value)
        except Exception:  # noqa: BLE001
            log.debug("could not emit %s", name, exc_info=True)

    def incr(self, name: str, count: int = 1) -> None:
        self._emit("incr", name, count)

    def gauge(self, name: str, value: float) -> None:
        self._emit("gauge", name, value)

    def timing(self, name: str, seconds: float) -> None:
        self._emit("timing", name, seconds * 1000.0)

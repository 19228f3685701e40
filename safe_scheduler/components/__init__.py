"""One small module per Airflow job process we replace; see ``safe_scheduler.component``."""

from __future__ import annotations

from safe_scheduler.component import Component


def get(name: str) -> Component:
    """The component called ``name`` ("scheduler", "triggerer", "dag-processor")."""
    if name == "scheduler":
        from safe_scheduler.components.scheduler import COMPONENT
    elif name == "triggerer":
        from safe_scheduler.components.triggerer import COMPONENT
    elif name == "dag-processor":
        from safe_scheduler.components.dag_processor import COMPONENT
    else:
        raise KeyError(name)
    return COMPONENT


NAMES = ("scheduler", "triggerer", "dag-processor")

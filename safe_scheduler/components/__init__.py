"""One small module per Airflow job process we replace; see ``safe_scheduler.component``."""

from __future__ import annotations

import importlib

from safe_scheduler.component import Component


def get(name: str) -> Component:
    """The component called ``name`` ("dag-processor" lives in ``components/dag_processor.py``)."""
    return importlib.import_module(f"safe_scheduler.components.{name.replace('-', '_')}").COMPONENT

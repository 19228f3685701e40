"""One small module per Airflow job process we replace; see ``safe_scheduler.component``.

A new component is one module here plus its name in ``NAMES`` (and a console script in
``pyproject.toml``).
"""

from __future__ import annotations

import importlib

from safe_scheduler.component import Component, key_of

#: Every component, by the ``airflow`` command it replaces.
NAMES = ("scheduler", "triggerer", "dag-processor", "celery-worker")


def get(name: str) -> Component:
    """The component called ``name`` ("dag-processor" lives in ``components/dag_processor.py``)."""
    return importlib.import_module(f"safe_scheduler.components.{key_of(name)}").COMPONENT

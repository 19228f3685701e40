"""One module per process we replace, each owning its Airflow code (``components.base``).

The registry is one list: the console scripts in ``pyproject.toml`` (``airflow-safe-<name> =
"safe_scheduler.entry:<key>"``). ``names`` reads it from the installed distribution, ``entry``
makes each script's function from it, and ``get`` imports the module of the same key. So a new
component is its module here plus its line there.
"""

from __future__ import annotations

import importlib
import sys

from safe_scheduler.components.base import Component, key_of, name_of

#: The prefix of every console script of ours.
PREFIX = "airflow-safe-"


def names() -> list[str]:
    """Every component, by the ``airflow`` command it replaces, sorted."""
    if sys.version_info >= (3, 8):
        from importlib.metadata import distribution
    else:  # Python 3.7 (Airflow 2.6.3's oldest)
        from importlib_metadata import distribution
    found = []
    for entry in distribution("airflow-safe-scheduler").entry_points:
        if entry.group == "console_scripts" and entry.value.startswith("safe_scheduler.entry:"):
            found.append(name_of(entry.value.split(":", 1)[1]))
    return sorted(found)


def get(name: str) -> Component:
    """The component called ``name`` ("dag-processor" lives in ``components/dag_processor.py``)."""
    return importlib.import_module(f"safe_scheduler.components.{key_of(name)}").COMPONENT

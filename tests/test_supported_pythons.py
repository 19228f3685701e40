"""What keeps the package working on every Python it supports, checked on the one CI runs.

CI runs Python 3.11 only, but the official image of 2.6.3 runs 3.7 by default. A walrus in one
module once made every command fail to import there, and a module 3.7 lacks made every final sweep
fail (both found by hand, README's "Tests"). These cost milliseconds; the core tests on another
interpreter (``PYTHON=... scripts/test``) remain the real check.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from safe_scheduler.children import tree

ROOT = Path(__file__).resolve().parents[1]


def _oldest_python() -> tuple[int, int]:
    """``requires-python`` of pyproject.toml: the one place that says which Pythons we support."""
    found = re.search(r'^requires-python\s*=\s*">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, "pyproject.toml has no requires-python of the form >=X.Y"
    return int(found[1]), int(found[2])


def test_every_module_parses_as_the_oldest_supported_python():
    oldest = _oldest_python()
    bad = []
    for path in sorted((ROOT / "safe_scheduler").rglob("*.py")):
        try:
            ast.parse(path.read_text(), str(path), feature_version=oldest)
        except SyntaxError as exc:
            bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert not bad, f"not Python {oldest[0]}.{oldest[1]}: " + "; ".join(bad)


def test_a_multiprocessing_without_the_trackers_we_know_does_not_fail_the_sweep(monkeypatch):
    """Python 3.7 names the tracker ``semaphore_tracker``; a later one may rename it again. Letting it
    end early is a nicety: the sweep after it must run either way."""
    monkeypatch.setitem(sys.modules, "multiprocessing.resource_tracker", None)  # import raises
    monkeypatch.setitem(sys.modules, "multiprocessing.semaphore_tracker", None)
    tree.let_resource_tracker_end()

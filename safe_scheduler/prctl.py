"""Linux ``prctl(2)``, the one system call children.py and threads.py need that Python lacks."""

from __future__ import annotations

import ctypes
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def prctl(option: int, arg: int | bytes) -> bool:
    """Call ``prctl(option, arg)``; False where there is none (not Linux) or it failed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False

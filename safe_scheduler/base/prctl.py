"""Linux ``prctl(2)``: the one system call the fork hook and our thread names need that Python lacks."""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, arg: object) -> None:
    """Call ``prctl(option, arg)``; raise OSError with the real errno where it fails or is missing.

    A silent False hid why a child went without its death signal (a seccomp profile that forbids
    ``prctl`` says EPERM); the caller decides whether that is worth a warning.
    """
    if not sys.platform.startswith("linux"):
        raise OSError(0, f"prctl is Linux only (this is {sys.platform})")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # An int goes as an unsigned long (ctypes would pass a C int and cut a pointer in half).
        value = ctypes.c_ulong(arg) if isinstance(arg, int) else arg
        result = libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        raise OSError(0, f"prctl unavailable: {exc}") from None
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def death_signal() -> int:
    """The signal this process gets when its parent dies (0: none)."""
    value = ctypes.c_int(0)
    prctl(PR_GET_PDEATHSIG, ctypes.byref(value))
    return value.value


def set_death_signal(sig: int, parent_pid: int) -> None:
    """Ask the kernel for ``sig`` when our parent (``parent_pid``) dies; raise OSError from prctl.

    If the parent is already gone by the time we ask (it died between fork and here), the request
    would never fire: deliver ``sig`` to ourselves at once instead.
    """
    prctl(PR_SET_PDEATHSIG, int(sig))
    if parent_pid and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)

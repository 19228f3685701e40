"""Whether a port we are about to serve on is free: checked before anything starts, so that a port
still held by an old process is one line and exit 2, not a traceback in a child."""

from __future__ import annotations

import errno
import socket

from safe_scheduler.base.errors import UsageError


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail if a server of ours could not bind ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free, as it would for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} ({what}) is already in use; is another scheduler, triggerer, "
                    "worker or log server still running on this host?"
                ) from None
            raise UsageError(f"cannot bind port {port} ({what}): {exc.strerror}") from None

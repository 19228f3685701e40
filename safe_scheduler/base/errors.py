"""What refuses a start: one line for the operator, exit code 2 (``exitcodes.USAGE``)."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with how the command was invoked or configured; the message is one line."""


class Unreachable(UsageError):
    """A service the job needs does not answer: refused, timed out, a name that does not resolve, a
    server starting or shutting down (a failover, a restart). Waited for at start (``dbwait``)."""


class DatabaseUnreachable(Unreachable):
    """The metadata database does not answer."""


class BrokerUnreachable(Unreachable):
    """The Celery broker does not answer."""

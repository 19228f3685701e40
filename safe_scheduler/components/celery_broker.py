"""The Celery broker, as the worker and the scheduler's CeleryExecutor see it: recognised once.

* ``is_redis``: whether a broker URL goes to kombu's Redis transport (``redis://``, ``rediss://``,
  ``sentinel://``, ``redis+socket://``), as kombu itself resolves it: the one place we tell.
* ``Broker``: asks the broker for a PING through kombu's own connection, for every kind of Redis
  URL, with a bound on each step: the worker's check at start, the scheduler's hold of sends.
* ``SendHold``: CeleryExecutor holds its sends while the broker does not answer.

Why the hold (measured, ``tests/test_celery.py``, Airflow 3.3.2 and 2.11.2): with the broker
stopped for 20 s, the scheduler went on queueing, every send failed after ``[celery]
task_publish_max_retries``, and the executor marked each of those task instances failed: 29 of
them, none of which ran once the broker was back. Airflow records a task instance as QUEUED
before it sends it, and keeps it in the executor's queue until ``trigger_tasks`` sends it. So
before a round of sends we ask the broker (one second at most); if it does not answer, the round is
skipped and the task instances wait, QUEUED, for the next heartbeat. The scheduler's slots count
them, so nothing piles up, and ``[scheduler] task_queued_timeout`` still applies to a longer outage.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from safe_scheduler.base.errors import BrokerUnreachable, UsageError
from safe_scheduler.base.metrics import Metrics

log = logging.getLogger("safe_scheduler.celery_broker")

#: Seconds the broker gets to answer a PING before a round of sends is held.
PING_TIMEOUT = 1.0
#: Seconds a new broker connection may take at start.
CONNECT_TIMEOUT = 10.0


def is_redis(url: str) -> bool:
    """Whether ``url`` goes to kombu's Redis transport (its own aliases, ``redis+socket`` too)."""
    from kombu.transport import TRANSPORT_ALIASES
    from kombu.utils.url import url_to_parts

    try:
        scheme = url_to_parts(url).scheme.split("+", 1)[0]
    except Exception:  # noqa: BLE001 - not a URL kombu reads: not one of ours to handle
        return False
    return str(TRANSPORT_ALIASES.get(scheme, "")).startswith("kombu.transport.redis:")


class Broker:
    """A Redis broker reached through kombu, with its own client once connected."""

    def __init__(self, url: str, timeout: float) -> None:
        from kombu import Connection

        self.url = url
        self._connection = Connection(url, connect_timeout=timeout, transport_options={
            "socket_timeout": timeout, "socket_connect_timeout": timeout, "max_retries": 0,
        })
        self._client: Any = None

    @property
    def redacted(self) -> str:
        from kombu.utils.url import maybe_sanitize_url

        return maybe_sanitize_url(self.url)

    def ping(self) -> None:
        """Raise what the transport raised unless the broker answers a PING now."""
        if self._client is None:
            self._connection.connect()  # one try, no retries
            self._client = self._connection.channel().client  # kombu's Redis channel PINGs as it opens
            return
        self._client.ping()

    def close(self) -> None:
        self._client = None
        try:
            self._connection.release()
        except Exception:  # noqa: BLE001 - closing a connection that is gone
            pass


def check(url: str) -> None:
    """At start: a Redis broker must answer a PING (``BrokerUnreachable`` while it does not, so that
    the start waits for it); one that refuses us (a password) or answers wrong is refused at once.
    Other brokers are left to Celery's own retries on start-up."""
    if not is_redis(url):
        return
    import redis

    broker = Broker(url, CONNECT_TIMEOUT)
    try:
        broker.ping()
    except redis.AuthenticationError as exc:
        raise UsageError(f"the Celery broker {broker.redacted} refused us: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnreachable(f"cannot reach the Celery broker {broker.redacted}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - kombu and redis raise their own kinds
        raise UsageError(f"the Celery broker {broker.redacted} answers wrong: {type(exc).__name__}: {exc}") from None
    finally:
        broker.close()


class SendHold:
    """Whether the broker answers before a round of sends, with the transitions logged once each."""

    def __init__(self, broker: Broker, metrics: Metrics) -> None:
        self.broker = broker
        self.metrics = metrics
        self.down_since: float | None = None

    def answers(self) -> bool:
        try:
            self.broker.ping()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "not now"
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.metrics.incr("broker_unreachable")
                log.warning("The Celery broker does not answer (%s); holding queued task instances "
                            "until it does, instead of failing them", type(exc).__name__)
            return False
        if self.down_since is not None:
            log.warning("The Celery broker answers again after %.0fs; sending the held task instances",
                        time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def install(self, executor: Any) -> None:
        """Wrap ``executor.trigger_tasks`` (the one place both Airflow 2 and 3 send from)."""
        trigger_tasks = executor.trigger_tasks

        @functools.wraps(trigger_tasks)
        def trigger_tasks_while_the_broker_answers(*args: Any, **kwargs: Any) -> Any:
            if executor.queued_tasks and not self.answers():
                return None
            return trigger_tasks(*args, **kwargs)

        executor.trigger_tasks = trigger_tasks_while_the_broker_answers
        log.info("Celery sends are held while the broker does not answer")


def broker_url() -> str:
    """``[celery] broker_url``, or "" (the key comes with the Celery provider)."""
    from airflow.configuration import conf

    try:
        return conf.get("celery", "broker_url", fallback="") or ""
    except Exception:  # noqa: BLE001 - a secret backend's failure is the executor's to report
        return ""


def hold_sends(executor: Any, metrics: Metrics) -> bool:
    """Hold ``executor``'s sends while its Redis broker does not answer; False where this executor
    or its broker is not one we hold for."""
    if type(executor).__name__ != "CeleryExecutor":
        return False
    url = broker_url()
    if not is_redis(url):
        return False
    SendHold(Broker(url, PING_TIMEOUT), metrics).install(executor)
    return True

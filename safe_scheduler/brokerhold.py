"""CeleryExecutor: hold the sends while the Redis broker does not answer, instead of failing tasks.

Measured (``tests/test_celery.py``, Airflow 3.3.2 and 2.11.2): with the broker stopped for 20 s,
the scheduler went on queueing, every send failed after ``[celery] task_publish_max_retries``, and
the executor marked each of those task instances failed: 29 of them, none of which ran once the
broker was back (with ``retries`` they would run after ``retry_delay``). A frozen broker costs the
same, plus ``[celery] operation_timeout`` per send in the scheduler's loop.

Airflow records a task instance as QUEUED before it sends it, and keeps it in the executor's queue
until ``trigger_tasks`` sends it. So before a round of sends we ask the broker (a Redis ``PING``,
one second at most); if it does not answer, the round is skipped and the task instances wait,
QUEUED, for the next heartbeat. The scheduler's slots count them, so nothing piles up, and Airflow's
own ``[scheduler] task_queued_timeout`` still applies to an outage longer than that. One line when
the broker stops answering and one when it is back; the metric ``broker_unreachable`` counts the
outages. Brokers other than Redis are left as Airflow runs them.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from safe_scheduler.metrics import Metrics

log = logging.getLogger("safe_scheduler.brokerhold")

#: Seconds the broker gets to answer a PING before a round of sends is held.
PING_TIMEOUT = 1.0


class Broker:
    """Whether the broker answers, with the transitions logged once each."""

    def __init__(self, url: str, metrics: Metrics) -> None:
        import redis

        self.metrics = metrics
        self.client = redis.Redis.from_url(url, socket_timeout=PING_TIMEOUT, socket_connect_timeout=PING_TIMEOUT)
        self.down_since: float | None = None

    def answers(self) -> bool:
        try:
            self.client.ping()
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


def broker_url() -> str:
    """``[celery] broker_url``, or "" (the key comes with the Celery provider)."""
    from airflow.configuration import conf

    try:
        return conf.get("celery", "broker_url", fallback="") or ""
    except Exception:  # noqa: BLE001 - a secret backend's failure is the executor's to report
        return ""


def install(executor: Any, metrics: Metrics) -> bool:
    """Wrap ``executor.trigger_tasks`` (the one place both Airflow 2 and 3 send from); False if
    this executor or its broker is not one we hold for."""
    if type(executor).__name__ != "CeleryExecutor":
        return False
    url = broker_url()
    if not url.startswith(("redis://", "rediss://")):
        return False
    try:
        broker = Broker(url, metrics)
    except Exception:  # noqa: BLE001 - no redis client: Airflow's own behaviour, nothing worse
        log.debug("no Redis client for the broker check", exc_info=True)
        return False
    trigger_tasks = executor.trigger_tasks

    @functools.wraps(trigger_tasks)
    def trigger_tasks_while_the_broker_answers(*args: Any, **kwargs: Any) -> Any:
        if executor.queued_tasks and not broker.answers():
            return None
        return trigger_tasks(*args, **kwargs)

    executor.trigger_tasks = trigger_tasks_while_the_broker_answers
    log.info("Celery sends are held while the broker does not answer")
    return True

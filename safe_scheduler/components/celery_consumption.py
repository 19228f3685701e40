"""Whether a Celery worker consumes: the signs of it, and the reconnect that answers their absence.

It is not an Airflow job: no job row, no heartbeat. What proves it works is that its consumer
consumes. On Redis, kombu's consumer asks the broker for a message with a BRPOP that the server
answers within a second, with a message or with nothing; each answer read is a sign. When every
pool process is running a task the consumer asks for nothing, on purpose: then each turn of the
consumer's event loop that comes on time is a sign (at most one a second). The loop turns anyway:
its poll waits at most until the next timer entry (Celery's heartbeat every 2 s, at most 10 s), so a
turn later than that, by ``LATE``, says the loop was blocked meanwhile. Nothing of ours is scheduled
on the loop: a timer of our own was a wake-up of its own, and each loop turn costs the main process
a fraction of a millisecond (the prefork pool's ``on_poll_start`` and the poll itself; measured under
load, 8 % more CPU in the main process with a timer of ours). Other transports have no BRPOP answer:
there each turn on time counts (RabbitMQ's own heartbeats catch its dead connections). Where Celery
runs the consumer without an event loop, a timer ticks every ``TICK`` seconds instead, and its ticks
on time count as the turns would.

A connection that goes silent (a NAT or load balancer that dropped an idle connection, a Redis
failover behind a virtual IP: Celery's #8082, #10205, #10302) gives neither. Measured on stock 3.3.2:
the event loop waited forever in the PUBLISH of the worker's heartbeat event, then, with socket
timeouts, in one ack after another, each ack lost, the consumer's prefetch credit never returned,
and nothing consumed again. So the worker *reconnects* when an ack fails, or when ``stall_timeout``
passes without a sign (the stall watchdog's ``recover``): it shuts down every socket it holds to
the broker, which wakes whatever waits on one, and Celery's own recovery opens fresh connections
and a fresh channel, with its credit back, while running tasks go on. If no sign comes within
another ``stall_timeout``, the stall follows: the worker stops as on SIGTERM and exits 4, for its
supervisor to start a fresh one. A loop turn or a tick that comes late (the loop was blocked
meanwhile) is no sign, even with a full pool.

Before any of that, the broker connection gets what stock lacks where the user set nothing
(``socket_timeout``, ``socket_connect_timeout``, TCP keepalive; Redis only), so that no single
command waits forever.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from safe_scheduler.components.celery_broker import CONNECT_TIMEOUT

log = logging.getLogger("safe_scheduler.celery_worker")

#: Seconds between two ticks where the consumer has no event loop (a timer thread of Celery's).
TICK = 2.0
#: Seconds a loop turn (or a tick) may come after it was due before it says the loop was blocked:
#: half of ``BROKER_SOCKET_TIMEOUT``, so that one command waiting out its timeout is always seen.
LATE = 5.0
#: Seconds between two looks at the pool from the loop's turns (a turn comes many times a second
#: under load; the stall watchdog needs a sign far less often).
LOOK_EVERY = 1.0
#: The longest a kombu hub's poll waits with timer entries queued (its ``fire_timers``' max_delay),
#: and without any (its fixed 1 s).
POLL_AT_MOST, POLL_WITHOUT_TIMERS = 10.0, 1.0
#: Seconds a synchronous command on a broker socket may wait for its reply (Redis): far above a
#: healthy reply (milliseconds), far below the stall timeout. An ack that runs out of it means
#: the connection is gone: the worker reconnects at once (``_reconnect_when_an_ack_fails``).
BROKER_SOCKET_TIMEOUT = 10.0
#: Seconds between two reconnects at most (an ack failing after one must not undo it).
RECONNECT_GAP = 10.0


def on_redis(app: Any) -> bool:
    """Whether the app's broker is Redis, whose connections take the options above."""
    from safe_scheduler.components.celery_broker import is_redis

    return is_redis(str(app.conf.broker_url or ""))


class Consumption:
    """The signs of consumption of one Celery app's worker, handed to ``on_sign``'s callbacks; set up
    before the worker starts (a consumer bootstep, and kombu wrapped in this process only)."""

    def __init__(self, app: Any, pool_size: Callable[[], int]) -> None:
        self.app = app
        #: Processes in the worker's pool (0 before it exists).
        self.pool_size = pool_size
        self.on_sign: list[Callable[[], None]] = []
        self.reconnected_at = -RECONNECT_GAP
        #: Whether BRPOP answers are counted (Redis); elsewhere every tick counts.
        self.answers_read = on_redis(app)
        app.steps["consumer"].add(_consumer_ticks(self))
        if self.answers_read:
            _count_brpop_answers(self)
            _reconnect_when_an_ack_fails(self)

    def sign(self) -> None:
        for callback in self.on_sign:
            callback()

    def busy(self) -> bool:
        """Every pool process runs a task, so the consumer asks the broker for nothing, on purpose."""
        from celery.worker import state

        size = self.pool_size()
        return bool(size) and len(state.active_requests) >= size

    def reconnect(self) -> str:
        """Shut down every TCP socket this process holds to the broker: whatever waits on one wakes
        with an error, and Celery's recovery opens fresh connections. Returns what was done.

        At most once per ``RECONNECT_GAP``: the acks that fail because of the first reconnect must
        not shut down the connections that Celery has just opened."""
        now = time.monotonic()
        if now - self.reconnected_at < RECONNECT_GAP:
            return f"reconnected {now - self.reconnected_at:.1f}s ago"
        self.reconnected_at = now
        return reconnect(str(self.app.conf.broker_url or ""))


def _count_brpop_answers(consumption: Consumption) -> None:
    """Each BRPOP answer the consumer reads (a message or none) is a sign: kombu's Redis channel,
    wrapped in this process only (the worker is the one consumer here)."""
    from queue import Empty

    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    original = channel._brpop_read
    if getattr(original, "signs_for", None) is not None:
        original.signs_for.append(consumption)
        return

    def _brpop_read(self: Any, **options: Any) -> Any:
        try:
            result = original(self, **options)
        except Empty:  # an answer with no message is still an answer
            for each in _brpop_read.signs_for:
                each.sign()
            raise
        for each in _brpop_read.signs_for:
            each.sign()
        return result

    _brpop_read.signs_for = [consumption]  # type: ignore[attr-defined]
    channel._brpop_read = _brpop_read


def _reconnect_when_an_ack_fails(consumption: Consumption) -> None:
    """An ack that times out or finds its connection broken is a broker connection that went silent:
    kombu logs it ("Couldn't ack") and goes on, the message's prefetch credit is never returned, and
    the next command waits its timeout again. So the first such failure reconnects at once, without
    waiting for the stall timeout (kombu's ``Message.ack``, wrapped in this process only)."""
    from kombu.message import Message

    original = Message.ack
    if getattr(original, "reconnects", False):
        return

    def ack(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except Exception as exc:
            if isinstance(exc, self.MessageStateError):
                raise
            done = consumption.reconnect()
            log.warning("An ack failed (%s: %s); %s", type(exc).__name__, exc, done)
            raise

    ack.reconnects = True  # type: ignore[attr-defined]
    Message.ack = ack


def reconnect(broker_url: str) -> str:
    """``Consumption.reconnect`` for ``broker_url``: the sockets are found by their peer address."""
    import socket

    import psutil
    from kombu import Connection

    try:
        connection = Connection(broker_url.split(";")[0])
        host, port = connection.hostname or "localhost", int(connection.port or connection.default_port or 0)
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except Exception as exc:  # noqa: BLE001 - nothing to reconnect to: the stop follows
        return f"cannot tell the broker's address ({type(exc).__name__}: {exc})"
    shut = 0
    me = psutil.Process()
    connections = getattr(me, "net_connections", None) or me.connections  # psutil < 6 has only the latter
    for conn in connections(kind="tcp"):
        if not conn.raddr or conn.fd < 0 or conn.raddr.port != port or conn.raddr.ip not in addresses:
            continue
        try:
            sock = socket.socket(fileno=os.dup(conn.fd))
        except OSError:
            continue
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        shut += 1
    return f"shut down {shut} connection(s) to the broker at {host}:{port}"


def _consumer_ticks(consumption: Consumption) -> type:
    """A consumer bootstep, running while the consumer consumes (Celery stops it when the connection
    is lost and starts it again once it is back), that gives a sign for each turn of the event loop
    that comes on time while the pool is full (on Redis) or always (elsewhere); without an event
    loop, for each tick of a ``TICK`` timer that comes on time."""
    from celery import bootsteps

    class ConsumerTicks(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.entry: Any = None
            self.hub: Any = None
            #: The hub's timer entries, eta first: the list its loop reads each turn (kombu binds it
            #: once too; it is cleared in place, never replaced). None: a hub without one.
            self.queue: list | None = None
            self.due = self.next_look = 0.0
            self.last = time.monotonic()

        def start(self, consumer: Any) -> None:
            consumption.sign()
            self.hub = getattr(consumer, "hub", None)
            if self.hub is not None:
                self.queue = getattr(getattr(self.hub, "timer", None), "_queue", None)
                self.due = time.monotonic() + POLL_AT_MOST + LATE
                self.hub.on_tick.add(self.turn)
            else:
                self.last = time.monotonic()
                self.entry = consumer.timer.call_repeatedly(TICK, self.tick)

        def turn(self) -> None:
            """Each turn of the loop, after its timers fired and before its poll: was it on time, and
            when is the next one due? The poll waits until the next timer entry, at most."""
            now = time.monotonic()
            on_time = now <= self.due
            queue = self.queue
            if queue is None:
                poll = POLL_AT_MOST
            else:
                poll = min(max(queue[0][0] - now, 0.0), POLL_AT_MOST) if queue else POLL_WITHOUT_TIMERS
            self.due = now + poll + LATE
            if on_time and now >= self.next_look:
                self.next_look = now + LOOK_EVERY
                if not consumption.answers_read or consumption.busy():
                    consumption.sign()

        def tick(self) -> None:
            # A tick that comes late says the loop was blocked (a command waiting on the broker): it
            # proves nothing. On Redis the BRPOP answers are the signs until the pool is full.
            now = time.monotonic()
            on_time, self.last = now - self.last <= TICK + LATE, now
            if on_time and (not consumption.answers_read or consumption.busy()):
                consumption.sign()

        def stop(self, consumer: Any) -> None:
            if self.hub is not None:
                self.hub.on_tick.discard(self.turn)
            if self.entry is not None:
                self.entry.cancel()
                self.entry = None

        shutdown = stop

    return ConsumerTicks


def broker_timeouts(app: Any) -> dict[str, Any]:
    """Timeouts and keepalives for the Redis broker connections, where the user set none; returns
    what was added. Other transports are left as configured (RabbitMQ has its heartbeats)."""
    if not on_redis(app):
        return {}
    options = dict(app.conf.broker_transport_options or {})
    added = {
        key: value
        for key, value in (("socket_timeout", BROKER_SOCKET_TIMEOUT), ("socket_connect_timeout", CONNECT_TIMEOUT),
                           ("socket_keepalive", True))
        if key not in options
    }
    options.update(added)
    app.conf.broker_transport_options = options
    return added

"""``airflow celery worker``: where CeleryExecutor (the official chart's default) runs every task.

It is not an Airflow job: no job row, no heartbeat. What proves it works is that its consumer
consumes. On Redis, kombu's consumer asks the broker for a message with a BRPOP that the server
answers within a second, with a message or with nothing; each answer read is a sign of progress.
When every pool process is running a task the consumer asks for nothing, on purpose: each second of
that is a sign too. Other transports have no such reply: there, each tick of the consumer's event
loop counts (RabbitMQ's own heartbeats catch its dead connections).

A connection that goes silent (a NAT or load balancer that dropped an idle connection, a Redis
failover behind a virtual IP: Celery's #8082, #10205, #10302) gives neither. Measured on stock 3.3.2:
the event loop waited forever in the PUBLISH of the worker's heartbeat event, then, with socket
timeouts, in one ack after another, each ack lost, the consumer's prefetch credit never returned,
and nothing consumed again. So the worker *reconnects* when an ack fails, or when ``stall_timeout``
passes without a sign: it shuts down every socket it holds to the broker (``reconnect``), which
wakes whatever waits on one, and Celery's own recovery opens fresh connections and a fresh channel,
with its credit back, while running tasks go on. If no sign comes within another
``stall_timeout``, it stops as on SIGTERM and exits 4, for its supervisor to start a fresh worker.
A timer tick that comes late (the loop was blocked meanwhile) is no sign, even with a full pool.

Before any of that, the broker connection gets what stock lacks where the user set nothing
(``socket_timeout``, ``socket_connect_timeout``, TCP keepalive; Redis only), so that no single
command waits forever.

Tasks run in children of the pool's processes (on 3.x the pool process supervises the task
process; on 2.x it starts ``airflow tasks run --local``): those are the tasks that get the drain,
SIGTERM and their cleanup time on the way out, as under the scheduler's LocalExecutor. Celery's own
warm shutdown runs beside it in the main thread: it stops consuming and waits for the pool, which
empties as the tasks end. The defaults fit the chart's 600 s ``terminationGracePeriodSeconds``.

What differs per release: ``--team`` (3.2+), logging set-up (3.x's structlog; 2.x's ORM without a
pool and a DB pre-check), the stale-bundle cleanup process (3.x).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from safe_scheduler import compat
from safe_scheduler.component import Component, Server
from safe_scheduler.settings import UsageError

log = logging.getLogger("safe_scheduler.celery_worker")

#: Seconds between two ticks of the consumer loop (a kombu timer entry: nothing runs outside the loop).
TICK = 1.0
#: A tick this late (seconds since the one before) says the event loop was blocked meanwhile.
LATE = 2.5 * TICK
#: Seconds a synchronous command on a broker socket may wait for its reply (Redis): far above a
#: healthy reply (milliseconds), far below the stall timeout. An ack that runs out of it means
#: the connection is gone: the worker reconnects at once (``_reconnect_when_an_ack_fails``).
BROKER_SOCKET_TIMEOUT = 10.0
#: Seconds between two reconnects at most (an ack failing after one must not undo it).
RECONNECT_GAP = 10.0
#: Seconds a new broker connection may take.
BROKER_CONNECT_TIMEOUT = 10.0
#: URL schemes of kombu's Redis transport, whose connections take the options above.
REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://", "redis+socket://")


def find_command() -> Any:
    """The provider's ``airflow celery worker`` definition: its flags are ours."""
    try:
        from airflow.providers.celery.cli.definition import CELERY_COMMANDS
    except ImportError:
        try:  # providers before the CLI moved to its own module
            from airflow.providers.celery.executors.celery_executor import CELERY_COMMANDS
        except ImportError:
            raise UsageError(
                "the Celery provider is not installed: pip install 'apache-airflow-providers-celery' "
                "(or apache-airflow[celery]) with the constraints of your Airflow release"
            ) from None
    return next(command for command in CELERY_COMMANDS if command.name == "worker")


def check(args: argparse.Namespace) -> None:
    """What ``airflow celery worker`` refuses from its flags and config (``--team``: 3.2+, multi_team)."""
    from airflow.configuration import conf

    if getattr(args, "team", None):
        if compat.AIRFLOW_VERSION < compat.Version("3.2.0"):
            raise UsageError("--team needs Airflow 3.2 or higher")
        if not conf.getboolean("core", "multi_team", fallback=False):
            raise UsageError("--team option may only be used when [core] multi_team is enabled")


def log_server_port() -> int:
    """``[logging] worker_log_server_port``, where the worker serves its task logs."""
    return int(compat.conf_get("logging", "worker_log_server_port", "8793"))


def stale_bundle_cleanup_interval() -> int:
    """3.x: seconds between the stale-bundle cleanup process's sweeps; 0 where there is none."""
    if not compat.AIRFLOW_3:
        return 0
    from airflow.configuration import conf

    try:
        return max(0, conf.getint("dag_processor", "stale_bundle_cleanup_interval", fallback=0))
    except Exception:  # noqa: BLE001 - the stock command starts none when it cannot read it
        return 0


def _bundle_cleanup(check_interval: int) -> None:
    """The stock worker's stale-bundle cleanup process, as a server of ours."""
    import time

    from airflow.dag_processing.bundles.base import BundleUsageTrackingManager

    manager = BundleUsageTrackingManager()
    while True:
        time.sleep(check_interval)
        manager.remove_stale_bundle_versions()


def servers(args: argparse.Namespace) -> list[Server]:
    found = []
    if not args.skip_serve_logs:
        port = log_server_port()
        found.append(Server("serve-logs", compat.serve_logs_target(port), "", port, "[logging] worker_log_server_port"))
    interval = stale_bundle_cleanup_interval()
    if interval:
        import functools

        # No port: host "" and port 0 are never checked (``preflight`` checks only what binds).
        found.append(Server("stale-bundle-cleanup", functools.partial(_bundle_cleanup, interval), "", 0, ""))
    return found


class CeleryWorker:
    """The worker as the stock command builds it, with our bootsteps, not yet started."""

    def __init__(self, app: Any, options: list[str]) -> None:
        self.app = app
        self.options = options
        self.on_tick: list[Callable[[], None]] = []
        self.pool: Any = None  # the WorkController's pool, once it has started
        self.reconnected_at = -RECONNECT_GAP
        app.steps["consumer"].add(_consumer_ticks(self))
        app.steps["worker"].add(_pool_seen(self))
        self.answers_read = _count_brpop_answers(self) if _on_redis(app) else False
        if self.answers_read:
            _reconnect_when_an_ack_fails(self)

    def tick(self) -> None:
        for callback in self.on_tick:
            callback()

    def run(self) -> None:
        """Celery's ``worker_main``, keeping the worker's exit code (``worker_main`` drops it)."""
        code = self.app.start(argv=self.options)
        if code:
            raise SystemExit(code)

    def pool_pids(self) -> set[int]:
        """The pool's processes (prefork); none for the threads, solo, eventlet and gevent pools."""
        try:
            return {p.pid for p in list(self.pool._pool._pool) if isinstance(getattr(p, "pid", None), int)}
        except Exception:  # noqa: BLE001 - not a process pool, or not started yet
            return set()

    def busy(self) -> bool:
        """Every pool process runs a task, so the consumer asks the broker for nothing, on purpose."""
        from celery.worker import state

        try:
            size = self.pool.num_processes
        except Exception:  # noqa: BLE001 - no pool yet
            return False
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


def _on_redis(app: Any) -> bool:
    return str(app.conf.broker_url or "").startswith(REDIS_SCHEMES)


def _count_brpop_answers(worker: CeleryWorker) -> bool:
    """Each BRPOP answer the consumer reads (a message or none) ticks: kombu's Redis channel, wrapped
    in this process only (the worker is the one consumer here)."""
    from queue import Empty

    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    original = channel._brpop_read
    if getattr(original, "ticks_for", None) is not None:
        original.ticks_for.append(worker)
        return True

    def _brpop_read(self: Any, **options: Any) -> Any:
        try:
            result = original(self, **options)
        except Empty:  # an answer with no message is still an answer
            for each in _brpop_read.ticks_for:
                each.tick()
            raise
        for each in _brpop_read.ticks_for:
            each.tick()
        return result

    _brpop_read.ticks_for = [worker]  # type: ignore[attr-defined]
    channel._brpop_read = _brpop_read
    return True


def _reconnect_when_an_ack_fails(worker: CeleryWorker) -> None:
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
            done = worker.reconnect()
            log.warning("An ack failed (%s: %s); %s", type(exc).__name__, exc, done)
            raise

    ack.reconnects = True  # type: ignore[attr-defined]
    Message.ack = ack


def reconnect(broker_url: str) -> str:
    """``CeleryWorker.reconnect`` for ``broker_url``: the sockets are found by their peer address."""
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


def _consumer_ticks(worker: CeleryWorker) -> type:
    """A consumer bootstep, running while the consumer consumes (Celery stops it when the connection
    is lost and starts it again once it is back), that ticks every ``TICK`` seconds from the event
    loop while the pool is full (on Redis), or always (elsewhere)."""
    from celery import bootsteps

    class ConsumerTicks(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.entry: Any = None
            self.last = time.monotonic()

        def start(self, consumer: Any) -> None:
            worker.tick()
            self.last = time.monotonic()
            self.entry = consumer.timer.call_repeatedly(TICK, self.second)

        def second(self) -> None:
            # A tick that comes late says the loop was blocked (a command waiting on the broker):
            # it proves nothing, even with a full pool, whose finished tasks wait on that loop.
            now = time.monotonic()
            on_time, self.last = now - self.last <= LATE, now
            if on_time and (not worker.answers_read or worker.busy()):
                worker.tick()

        def stop(self, consumer: Any) -> None:
            if self.entry is not None:
                self.entry.cancel()
                self.entry = None

        shutdown = stop

    return ConsumerTicks


def _pool_seen(worker: CeleryWorker) -> type:
    """A worker bootstep that hands us the pool once Celery has made it (its processes run the tasks)."""
    from celery import bootsteps

    class PoolSeen(bootsteps.StartStopStep):
        requires = ("celery.worker.components:Pool",)

        def start(self, controller: Any) -> None:
            worker.pool = controller.pool

    return PoolSeen


def broker_timeouts(app: Any) -> dict[str, Any]:
    """Timeouts and keepalives for the Redis broker connections, where the user set none; returns
    what was added. Other transports are left as configured (RabbitMQ has its heartbeats)."""
    if not _on_redis(app):
        return {}
    options = dict(app.conf.broker_transport_options or {})
    added = {
        key: value
        for key, value in (("socket_timeout", BROKER_SOCKET_TIMEOUT), ("socket_connect_timeout", BROKER_CONNECT_TIMEOUT),
                           ("socket_keepalive", True))
        if key not in options
    }
    options.update(added)
    app.conf.broker_transport_options = options
    return added


def _celery_app(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Celery app and the config it reads, as the stock command picks them (``--team``: 3.2+)."""
    from airflow.configuration import conf

    if getattr(args, "team", None):
        from airflow.executors.base_executor import ExecutorConf
        from airflow.providers.celery.executors.celery_executor_utils import create_celery_app

        team_config = ExecutorConf(team_name=args.team)
        return create_celery_app(team_config), team_config
    from airflow.providers.celery.executors.celery_executor import app

    return app, conf


def _refuse_duplicate_hostname(app: Any, hostname: str) -> None:
    """The stock check, on a throwaway app: kombu's pools are reset after (Airflow #59707)."""
    import kombu.pools
    from celery import Celery

    temp_app = Celery()
    temp_app.conf.update(app.conf)
    try:
        active = temp_app.control.inspect().active_queues()
        if active and any(name.endswith(f"@{hostname}") for name in active):
            raise SystemExit(
                f"Error: A worker with hostname '{hostname}' is already running. "
                "Please use a different hostname or stop the existing worker first."
            )
    finally:
        temp_app.close()
        kombu.pools.reset()


def _configure_logging(config: Any) -> None:
    """What the stock command sets up before the worker starts: 3.x's structlog, 2.x's ORM."""
    if compat.AIRFLOW_3:
        from airflow.sdk.log import configure_logging

        json_raw = config.get("celery", "json_logs", fallback="")
        if json_raw and json_raw.lower() != "none":
            json_output = config.getboolean("celery", "json_logs")
        else:
            json_output = config.getboolean("logging", "json_logs", fallback=False)
        try:
            configure_logging(output=sys.stdout.buffer, json_output=json_output)
        except TypeError:  # 3.0's SDK has no json_output
            configure_logging(output=sys.stdout.buffer)
        return
    from airflow import settings as airflow_settings

    # Stock: no connection pool, so the worker holds no idle DB connection; and a pre-check.
    airflow_settings.reconfigure_orm(disable_connection_pool=True)
    if not airflow_settings.validate_session():
        raise SystemExit("Worker exiting, database connection precheck failed.")


def new_job_runner(args: argparse.Namespace) -> CeleryWorker:
    """The worker, set up as the installed ``airflow celery worker`` sets it up, not yet started."""
    import sqlalchemy.exc
    from celery import maybe_patch_concurrency

    app, config = _celery_app(args)
    if args.celery_hostname:
        _refuse_duplicate_hostname(app, args.celery_hostname)
    _configure_logging(config)
    autoscale = args.autoscale
    if autoscale is None and config.has_option("celery", "worker_autoscale"):
        autoscale = config.get("celery", "worker_autoscale")
    if hasattr(app.backend, "ResultSession"):  # the stock command creates the result tables first
        with suppress(sqlalchemy.exc.IntegrityError):
            app.backend.ResultSession().close()
    loglevel = config.get("logging", "CELERY_LOGGING_LEVEL") or config.get("logging", "LOGGING_LEVEL")
    if args.verbose:
        loglevel = "DEBUG"
    options = ["worker", "-O", "fair", "--queues", args.queues, "--concurrency", str(args.concurrency),
               "--loglevel", loglevel]
    if args.celery_hostname:
        options += ["--hostname", args.celery_hostname]
    if autoscale:
        options += ["--autoscale", autoscale]
    if args.without_mingle:
        options.append("--without-mingle")
    if args.without_gossip:
        options.append("--without-gossip")
    if config.has_option("celery", "pool"):
        pool = config.get("celery", "pool")
        options += ["--pool", pool]
        maybe_patch_concurrency(["-P", pool])
    broker_timeouts(app)
    return CeleryWorker(app, options)


def check_broker(args: argparse.Namespace) -> None:
    """A Redis broker must answer a PING (``BrokerUnreachable`` while it does not, so that the start
    waits for it); one that refuses us (a password, a bad URL) is refused at once. Other brokers are
    left to Celery's own retries on start-up."""
    from safe_scheduler.dbwait import BrokerUnreachable

    app, _ = _celery_app(args)
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://")):
        return
    import redis
    from kombu.utils.url import maybe_sanitize_url as redacted

    try:
        client = redis.Redis.from_url(url, socket_timeout=BROKER_CONNECT_TIMEOUT,
                                      socket_connect_timeout=BROKER_CONNECT_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if isinstance(exc, redis.AuthenticationError):
            raise UsageError(f"the Celery broker {redacted(url)} refused us: {exc}") from None
        raise BrokerUnreachable(f"cannot reach the Celery broker {redacted(url)}: {exc}") from None
    except (redis.RedisError, ValueError) as exc:
        raise UsageError(f"the Celery broker {redacted(url)} answers wrong: {type(exc).__name__}: {exc}") from None


def on_progress(worker: CeleryWorker, callback: Callable[[], None]) -> None:
    worker.on_tick.append(callback)


def recover(worker: CeleryWorker) -> str:
    return worker.reconnect()


def daemon_options(args: argparse.Namespace) -> dict[str, Any]:
    """``-D``: the worker's umask (``--umask``, else ``[celery] worker_umask``) and pid file."""
    from airflow import settings as airflow_settings
    from airflow.configuration import conf
    from airflow.utils.cli import setup_locations

    umask = args.umask or conf.get("celery", "worker_umask", fallback=airflow_settings.DAEMON_UMASK)
    pid_file, _, _, _ = setup_locations(process="worker", stdout=args.stdout, stderr=args.stderr,
                                        log=args.log_file, pid=args.pid)
    return {"umask": umask, "pid_file": pid_file}


COMPONENT = Component(
    name="celery-worker",
    health_threshold=None,
    new_job_runner=new_job_runner,
    health_port=8978,
    # The chart gives workers 600 s from SIGTERM to SIGKILL: 585 are the deadline, and the backstops
    # behind it (8 s) and our parent's last sweep (5 s) fit in the rest. The tasks' cleanup (on_kill,
    # on_termination) gets 60 s, and the drain whatever is left once that, the children's stop and
    # the kills are paid: 518 s by default, less under a shorter shutdown_timeout (settings.load),
    # never a refusal. No heartbeat of Airflow's to derive the stall timeout from: 60 s, four times
    # BROKER_SOCKET_TIMEOUT, so one command's timeout comes first.
    defaults={"shutdown_timeout": 585.0, "task_cleanup_timeout": 60.0, "stall_timeout": 60.0},
    run=CeleryWorker.run,
    on_progress=on_progress,
    servers=servers,
    check=check,
    check_broker=check_broker,
    task_parents=CeleryWorker.pool_pids,
    process_name="worker",
    hurry_signals=("SIGQUIT",),
    progress="sign of consumption",
    recover=recover,
    find_command=find_command,
    stock_words=("celery", "worker"),
    daemon_options=daemon_options,
)

"""Run one component's job (scheduler, triggerer, dag-processor) with a shutdown that always ends.

This module knows nothing of which component runs: the ``Component`` names the job runner, its
servers and its executors. Read top to bottom, as gunicorn's arbiter: set up the watchers; run the
job with its servers; on any way out (return, exception, signal, stall) the shutdown's one deadline
starts, running tasks are stopped with time for their cleanup (``taskstop``), the executor is
ended within what is left, the servers are stopped together, whatever else is still below us is
swept, and the exit code comes from ``shutdown.exit_code`` alone.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from typing import Any

from safe_scheduler import (
    brokerhold, children, compat, dbtimeouts, forkhook, healthserver, output, signals, systemd, taskstop, tree,
)
from safe_scheduler.component import Component
from safe_scheduler.metrics import Metrics
from safe_scheduler.reaper import Parent
from safe_scheduler.settings import Settings
from safe_scheduler.shutdown import Cause, Shutdown
from safe_scheduler.stall import StallWatchdog

log = logging.getLogger("safe_scheduler.runner")


def run(component: Component, args: argparse.Namespace, settings: Settings, parent: Parent) -> int:
    """Run the component's job in this process; return its exit code once every child is gone."""
    started = time.monotonic()
    metrics = Metrics(component.key)
    shutdown = Shutdown(settings.shutdown_timeout, name=component.name, metrics=metrics)
    notifier = systemd.Notifier(parent_pid=parent.pid)
    stall = StallWatchdog(
        settings.stall_timeout, name=component.name, metrics=metrics, progress=component.progress,
        on_stall=lambda why: shutdown.begin(f"stalled: {why}", Cause.STALLED),
    )
    shutdown.on_begin += [notifier.stopping, stall.stop]

    def heard(name: str) -> None:
        if shutdown.started_at is not None or name in component.hurry_signals:
            shutdown.hurry(f"received {name}")
        else:
            shutdown.begin(f"received {name}", Cause.SIGNAL)

    signals.SignalListener(heard, also=component.hurry_signals).start()
    forkhook.install(settings.child_stop_timeout)
    if settings.db_timeouts:
        dbtimeouts.apply(compat.metadata_engine())

    try:
        _serve_health(settings, shutdown, stall)
        _run_job(component, args, settings, shutdown, stall, notifier, metrics)
    except BaseException as exc:  # noqa: BLE001 - every way out must reach the sweep below
        shutdown.run_ended(exc)
    else:
        shutdown.run_ended(None)
    # The servers are stopped; anything else below us (executor workers that end() did not finish,
    # tasks, a server's grandchildren) goes now, within what the deadline leaves.
    try:
        tree.let_resource_tracker_end()
        outcome = tree.stop(tree.descendants(), settings.child_stop_timeout, shutdown.remaining,
                            what="leftover processes")
        metrics.incr("children_killed", len(outcome.killed))
    except Exception:  # noqa: BLE001 - a bug of ours must not leave a child behind
        log.exception("The final sweep failed; killing every process below us")
        tree.kill_all_below_us()
    shutdown.report(time.monotonic() - started)
    return shutdown.exit_code()


def _run_job(
    component: Component, args: argparse.Namespace, settings: Settings, shutdown: Shutdown,
    stall: StallWatchdog, notifier: systemd.Notifier, metrics: Metrics,
) -> None:
    compat.set_mp_start_method(component.key)
    component.prepare(args)
    job_runner = component.new_job_runner(args)

    running: list[children.Servers] = []

    def heartbeat() -> None:
        stall.beat()
        notifier.heartbeat()
        for servers in running:  # a server that died is started again from here: the main thread
            servers.restart_due()

    component.on_progress(job_runner, heartbeat)
    if component.recover is not None:
        stall.recover = functools.partial(component.recover, job_runner)
    executors = component.executors(job_runner)
    tasks = taskstop.TaskStop(
        taskstop.below(lambda: component.task_parents(job_runner)), settings, shutdown.remaining, metrics,
    )
    shutdown.on_begin.insert(0, tasks.start)  # first: the other hooks may be slow, tasks need the time
    shutdown.on_hurry.append(tasks.hurry)
    # The scheduler loop's own ``finally`` calls ``executor.end()``, which waits for running tasks
    # with no bound (and Celery's may wait on its broker): that is already shutdown.
    for executor in executors:
        if hasattr(executor, "_log") and getattr(executor, "log", None) is not None:
            executor._log = _WithoutSignalAgain(executor.log)  # LoggingMixin's cached logger
        # What comes after the tasks must still fit: the servers' stop, and the kill of what is left.
        executor.end = _end_within_deadline(shutdown, tasks, executor.end, settings.after_tasks)
        brokerhold.install(executor, metrics)

    servers = [(server.name, server.target) for server in component.servers(args)]
    with children.running(servers, settings.child_stop_timeout, shutdown.remaining, metrics) as started:
        running.append(started)
        try:
            stall.start()
            component.run(job_runner)
        finally:
            shutdown.begin(f"{component.name} run ended")
            signals.hold(shutdown.remaining)


class _WithoutSignalAgain:
    """An executor's logger without LocalExecutor's "waiting for running tasks to finish. Signal
    again if you don't want to wait": that wait is bounded here (``taskstop`` says what it does
    instead), so the line misleads. A stdlib logger on 2.x, structlog's on 3.x: both go through
    here."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def info(self, message: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(message, str) and "Signal again if you don't want to wait" in message:
            return None
        return self._logger.info(message, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def _serve_health(settings: Settings, shutdown: Shutdown, stall: StallWatchdog) -> None:
    """Our liveness endpoint, from the first moment: the heartbeat age counts from here until the
    job's first heartbeat, and shutdown turns it to 503."""
    if not settings.enable_health_check:
        return
    health = healthserver.Health(
        stall.seconds_since_heartbeat, lambda: shutdown.started_at is not None, settings.unhealthy_after,
    )
    host, port = settings.health_check_server_host, settings.health_check_server_port
    try:
        healthserver.start(host, port, health)
    except OSError as exc:  # taken since the check at start (a race); the probe would fail anyway
        raise RuntimeError(f"cannot serve the liveness endpoint on {host}:{port}: {exc.strerror or exc}") from None


def _end_within_deadline(shutdown: Shutdown, tasks: taskstop.TaskStop, end: Any, after_tasks: float) -> Any:
    """``executor.end()`` once the tasks are stopped, given what the deadline leaves, not forever.

    Past that it is left running in its thread (the process is on its way out), and the stop goes
    on: the servers and the final sweep still fit, and the exit code stays the cause's.
    """

    @functools.wraps(end)
    def end_within_deadline(*args: Any, **kwargs: Any) -> Any:
        shutdown.begin("executor shutdown")
        tasks.wait()
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["value"] = end(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                result["error"] = exc

        budget = max(0.0, shutdown.remaining() - after_tasks)
        if not output.bounded(budget, call):
            output.in_background(
                log.warning, "executor.end() did not return within %.1fs; going on without it", budget
            )
            return None
        if "error" in result:
            raise result["error"]
        return result.get("value")

    return end_within_deadline

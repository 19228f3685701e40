"""Run one component's job with a shutdown that always ends: the core, read top to bottom.

This module knows no component by name: the ``Component`` says how its job runs, what servers it
keeps, what tasks run below it, and what capabilities it plugs in. As gunicorn's arbiter: set up
the watchers; run the job with its servers; on any way out (return, exception, signal, stall, the
parent's death) the shutdown's one deadline starts, and the stop follows in this order, within the
time plan that ``settings`` validated (``shutdown.budget``):

1. running tasks are drained, told to stop and given their cleanup time (``taskstop``, its own
   thread, the first hook of the shutdown: the main thread may be stuck);
2. the executors' ``end()`` gets what is left (the scheduler's capability: Airflow's loop calls it
   from its own ``finally``, which is why this step is a hook and not a line here);
3. the servers are stopped together (the ``with`` block's exit);
4. everything else still below us is swept, and the exit code comes from the one table.

After an unplanned end (the tiny parent died, so a restart is coming), the ports go first: the
servers are killed and the endpoint closed at once, and the tasks get their own time before step 1.
Airflow owns the main loop, so steps 1 and 2 start from hooks (the shutdown's, the executor's);
the order above is theirs all the same.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from safe_scheduler.base import exitcodes
from safe_scheduler.base.compat import set_mp_start_method
from safe_scheduler.base.metrics import Metrics
from safe_scheduler.children import servers as child_servers
from safe_scheduler.children import tree
from safe_scheduler.children.parent import Parent
from safe_scheduler.components.base import Component, Run
from safe_scheduler.liveness import healthserver, systemd
from safe_scheduler.liveness.stall import StallWatchdog
from safe_scheduler.shutdown import signals, taskstop
from safe_scheduler.shutdown.budget import TimePlan
from safe_scheduler.shutdown.owner import Shutdown

log = logging.getLogger("safe_scheduler.runner")


def run(component: Component, args: argparse.Namespace, settings: Any, parent: Parent) -> Shutdown:
    """Run the component's job in this process; return the finished shutdown once every child is gone."""
    started = time.monotonic()
    metrics = Metrics(component.key)
    shutdown = Shutdown(settings.plan, name=component.name, metrics=metrics)
    notifier = systemd.Notifier(parent_pid=parent.pid)
    stall = StallWatchdog(
        settings.stall_timeout, name=component.name, metrics=metrics, progress=component.job.progress,
        on_stall=lambda why: shutdown.begin(f"stalled: {why}", exitcodes.Cause.STALLED),
    )
    shutdown.on_begin += [notifier.stopping, stall.stop]
    signals.SignalListener(_listener(shutdown, parent, component.job.hurry_signals),
                           also=component.job.hurry_signals).start()
    notes: list[Any] = []  # what a capability adds to the endpoint's body (``Run.notes``)
    try:
        endpoint = _serve_health(settings, shutdown, stall, notes)
        _run_job(component, args, settings, shutdown, stall, notifier, metrics, endpoint, notes)
    except BaseException as exc:  # noqa: BLE001 - every way out must reach the sweep below
        shutdown.run_ended(exc)
    else:
        shutdown.run_ended(None)
    # The servers are stopped; anything else below us (executor workers that end() did not finish,
    # tasks, a server's grandchildren) goes now, within what the deadline leaves.
    try:
        tree.let_resource_tracker_end()
        outcome = tree.stop(tree.descendants(), settings.child_stop_timeout,
                            lambda: TimePlan.polite_room(shutdown.remaining()), what="leftover processes")
        metrics.incr("children_killed", len(outcome.killed))
    except Exception:  # noqa: BLE001 - a bug of ours must not leave a child behind
        log.exception("The final sweep failed; killing every process below us")
        tree.kill_all_below_us()
    shutdown.report(time.monotonic() - started)
    return shutdown


def _listener(shutdown: Shutdown, parent: Parent, hurry_signals: tuple[str, ...]) -> Any:
    """What a signal means: the parent's death is an unplanned end; a second signal, or a signal
    that means it (Celery's SIGQUIT), is "stop now"; else a planned stop."""
    heard: list[str] = []

    def on_signal(name: str) -> None:
        if parent.gone():
            shutdown.begin("the parent is gone (killed?)", exitcodes.Cause.ORPHANED)
        elif heard or name in hurry_signals:
            shutdown.hurry(f"received {name}")
        else:
            shutdown.begin(f"received {name}", exitcodes.Cause.SIGNAL)
        heard.append(name)

    return on_signal


def _run_job(
    component: Component, args: argparse.Namespace, settings: Any, shutdown: Shutdown,
    stall: StallWatchdog, notifier: systemd.Notifier, metrics: Metrics, endpoint: Any, notes: list[Any],
) -> None:
    job = component.job
    set_mp_start_method(component.key)
    job.prepare(args)
    job_runner = job.new_runner(args)
    running: list[child_servers.Servers] = []

    def heartbeat() -> None:
        stall.beat()
        notifier.heartbeat()
        for servers in running:  # a server that died is started again from here: the main thread
            servers.restart_due()

    job.on_progress(job_runner, heartbeat)
    tasks = None
    if component.tasks is not None:
        parents = component.tasks.parents
        tasks = taskstop.TaskStop(taskstop.below(lambda: parents(job_runner)), shutdown, metrics)
        shutdown.on_begin.insert(0, tasks.start)  # first: the other hooks may be slow, tasks need the time
        shutdown.on_hurry.append(tasks.hurry)
        shutdown.tasks_running = tasks.running
    run = Run(shutdown=shutdown, stall=stall, metrics=metrics, tasks=tasks, notes=notes)
    for capability in component.capabilities:
        capability.attach(job_runner, run)

    def ports_first() -> None:
        """An unplanned end: a restart is coming, and must find every port free."""
        for servers in running:
            servers.stop(0.0)
        if endpoint is not None:
            endpoint.close()

    shutdown.on_orphaned.append(ports_first)
    targets = [(server.name, server.target) for server in component.servers(args)]
    with child_servers.running(targets, settings.child_stop_timeout,
                               lambda: TimePlan.polite_room(shutdown.remaining()), metrics) as started:
        running.append(started)
        try:
            stall.start()
            job.run(job_runner)
        finally:
            shutdown.begin(f"{component.name} run ended")
            signals.hold(shutdown.remaining)


def _serve_health(settings: Any, shutdown: Shutdown, stall: StallWatchdog,
                  notes: list[Any]) -> healthserver.HealthServer | None:
    """Our liveness endpoint, from the first moment: the heartbeat age counts from here until the
    job's first heartbeat, and shutdown turns it to 503."""
    if not settings.enable_health_check:
        return None
    health = healthserver.Health(
        stall.seconds_since_heartbeat, lambda: shutdown.started_at is not None, settings.unhealthy_after, notes,
    )
    host, port = settings.health_check_server_host, settings.health_check_server_port
    try:
        return healthserver.start(host, port, health)
    except OSError as exc:  # taken since the check at start (a race); the probe would fail anyway
        raise RuntimeError(f"cannot serve the liveness endpoint on {host}:{port}: {exc.strerror or exc}") from None

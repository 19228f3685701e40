"""Our ``_run_scheduler_job``: the same job, with a shutdown that always ends.

The structure follows gunicorn's arbiter: run; on any way out (return, exception, signal) start
the shutdown clock, stop the children politely, then firmly, sweep up whatever else we forked,
and leave the interpreter in a way nothing can block.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import threading
import time
from contextlib import ExitStack
from typing import Any, NoReturn

from safe_scheduler import children, compat, dbtimeouts, exitcodes, metrics, systemd
from safe_scheduler.settings import Settings
from safe_scheduler.stall import StallWatchdog
from safe_scheduler.watchdog import ExitWatchdog, flush_logs

log = logging.getLogger("safe_scheduler")

#: Seconds non-daemon threads get to finish once the scheduler's run is over and children are gone.
THREAD_JOIN_GRACE = 1.5


def _arm_before(watchdog: ExitWatchdog, reason: str, func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        watchdog.arm(reason)
        return func(*args, **kwargs)

    return wrapper


def run_scheduler_job(
    args: argparse.Namespace, settings: Settings, watchdog: ExitWatchdog, stall: StallWatchdog,
    notifier: systemd.Notifier,
) -> None:
    """Run the scheduler job with its serve-logs and health-check children, exception-safe."""
    compat.set_mp_start_method()
    job_runner = compat.new_job_runner(args)

    def heartbeat() -> None:
        stall.beat()
        notifier.heartbeat()

    compat.on_heartbeat(job_runner, heartbeat)
    # The scheduler loop's own ``finally`` calls ``executor.end()``, which waits for running tasks
    # with no bound: that is already shutdown, so the deadline starts there.
    for executor in compat.executors(job_runner):
        executor.end = _arm_before(watchdog, "executor shutdown", executor.end)

    from airflow.configuration import conf

    with ExitStack() as stack:
        if not args.skip_serve_logs and compat.serves_logs():
            stack.enter_context(
                children.supervised("serve-logs", compat.serve_logs_target(), settings.child_stop_timeout)
            )
        if conf.getboolean("scheduler", "enable_health_check"):
            stack.enter_context(
                children.supervised("health-check", compat.health_check_target(), settings.child_stop_timeout)
            )
        try:
            stall.start()
            compat.run_job(job_runner)
        finally:
            watchdog.arm("scheduler run ended")
            watchdog.hold_signals()


def exit_code_of(exc: BaseException) -> int:
    """Map what ended the run to our documented exit codes, logging failures.

    A second exception raised while handling the first (SIGTERM's SystemExit(0) during the cleanup
    of a database error, or the reverse) does not change what ended the run: the first one decides.
    """
    chain = [exc]
    while chain[-1].__context__ is not None and chain[-1].__context__ not in chain:
        chain.append(chain[-1].__context__)
    root = chain[-1]
    for error in chain:
        if not isinstance(error, (SystemExit, KeyboardInterrupt)):
            log.error("Scheduler failed: %s: %s", type(error).__name__, error, exc_info=error)
            break
    if isinstance(root, SystemExit):
        if root.code is None or isinstance(root.code, int):
            return root.code or exitcodes.OK
        log.error("Scheduler exited: %s", root.code)
        return exitcodes.FAILED
    if isinstance(root, KeyboardInterrupt):
        return exitcodes.OK
    return exitcodes.FAILED


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the scheduler in this process; return once it is over and every child is reaped."""
    watchdog = ExitWatchdog(settings.shutdown_timeout)
    notifier = systemd.Notifier()

    def stalled(why: str) -> None:
        watchdog.arm(f"stalled: {why}", forced_code=exitcodes.STALLED, forced_kind="stall")

    stall = StallWatchdog(settings.stall_timeout, on_stall=stalled)
    watchdog.on_arm += [notifier.stopping, stall.stop]
    watchdog.watch_signals()
    children.install_fork_hook(orphan_grace=settings.child_stop_timeout)
    if settings.db_timeouts:
        dbtimeouts.apply(compat.metadata_engine())
    started = time.monotonic()
    code = exitcodes.OK
    try:
        run_scheduler_job(args, settings, watchdog, stall, notifier)
    except BaseException as exc:  # noqa: BLE001 - every way out must reach the finally below
        watchdog.arm(f"{type(exc).__name__} left the scheduler")
        code = exit_code_of(exc)
    finally:
        watchdog.arm("scheduler run ended")
        children.stop_descendants(settings.child_stop_timeout)
    if stall.stalled:
        code = exitcodes.STALLED
    shutdown_took = settings.shutdown_timeout - watchdog.remaining()
    metrics.timing("shutdown_duration", shutdown_took)
    log.info(
        "Scheduler stopped after %.1fs; exit code %d (shutdown: %s, took %.1fs)",
        time.monotonic() - started,
        code,
        watchdog.reason,
        shutdown_took,
    )
    return code


def exit_process(code: int) -> NoReturn:
    """Leave the interpreter with ``code``, even if a non-daemon thread would hold it.

    Python joins every non-daemon thread before exiting, forever. Once the run is over and the
    children are gone, such a thread can only be a leak (a plugin, a library's worker): give it a
    moment, name it, run the atexit handlers ourselves (still under the exit watchdog), and go.
    """
    main = threading.main_thread()
    deadline = time.monotonic() + THREAD_JOIN_GRACE
    blockers = [t for t in threading.enumerate() if t is not main and not t.daemon]
    for thread in blockers:
        thread.join(max(0.0, deadline - time.monotonic()))
    blockers = [t for t in blockers if t.is_alive()]
    if not blockers:
        raise SystemExit(code)
    log.warning(
        "Non-daemon thread(s) would block interpreter exit: %s; exiting with code %d without them",
        ", ".join(f"{t.name!r} ({t.ident})" for t in blockers),
        code,
    )
    try:
        atexit._run_exitfuncs()
    finally:
        flush_logs()
        os._exit(code)

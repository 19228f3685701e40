"""The job process's ``main``: follow the parent, refuse bad input with one line, run the job.

Everything that can be wrong before the job starts (a flag, a setting, a port, the database) ends
here with one line on stderr and exit code 2, never a traceback (``preflight``). Whatever escapes
the job itself still leaves with an exit code from the one table (``shutdown``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, NoReturn

from safe_scheduler.base import exitcodes
from safe_scheduler.base.errors import UsageError
from safe_scheduler.children import parent as tiny_parent


def main(argv: list[str], name: str = "scheduler") -> NoReturn:
    prog = f"airflow-safe-{name}"
    parent = tiny_parent.follow_parent()
    if parent.no_death_signal:
        print(f"{prog}: warning: no death signal from the parent ({parent.no_death_signal})", file=sys.stderr)
    try:
        # Deprecation warnings Airflow emits while we load it would bury the one line that says
        # why we refuse to start; they come back once the job runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from safe_scheduler.startup import preflight

            component, args, settings = preflight.prepare(name, argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exitcodes.USAGE)

    from safe_scheduler.base import compat
    from safe_scheduler.children import forkhook
    from safe_scheduler.core import runner
    from safe_scheduler.shutdown import owner
    from safe_scheduler.startup import dbtimeouts

    compat.print_banner()
    result: dict[str, Any] = {}

    def job() -> None:
        # Here, not before: with -D this runs in the daemon, which the ties must take as the job.
        plan = settings.plan
        lineage = forkhook.install(plan.child_stop_timeout, plan.orphaned_task_timeout, plan.task_cleanup_timeout)
        parent.tell(plan.orphans_gone_within, lineage.lifeline_name())
        if settings.db_timeouts:
            dbtimeouts.apply(compat.metadata_engine())
        result["stop"] = runner.run(component, args, settings, parent)
        result["code"] = result["stop"].exit_code()

    try:
        compat.run_with_daemon_option(args, compat.with_providers_configuration(job), component.daemon_name,
                                      **component.job.daemon_options(args))
    except BaseException as exc:  # noqa: BLE001 - e.g. "already running" from the daemon pidfile
        if "code" not in result:
            result["code"] = exitcodes.of_run(exc)
            if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                print(f"{component.prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    stop = result.get("stop")
    owner.leave(result.get("code", exitcodes.FAILED), stop.remaining if stop is not None else lambda: owner.THREAD_JOIN_GRACE)

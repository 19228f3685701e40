"""The job process's ``main``: follow the parent, refuse bad input with one line, run the job.

Everything that can be wrong before the job starts (a flag, a setting, a port, the database) ends
here with one line on stderr and exit code 2, never a traceback (``preflight``). Whatever escapes
the job itself still leaves with an exit code from the one table (``shutdown``).
"""

from __future__ import annotations

import sys
import warnings
from typing import NoReturn

from safe_scheduler import exitcodes, reaper
from safe_scheduler.settings import UsageError


def main(argv: list[str], name: str = "scheduler") -> NoReturn:
    prog = f"airflow-safe-{name}"
    parent = reaper.follow_parent()
    if parent.no_death_signal:
        print(f"{prog}: warning: no death signal from the parent ({parent.no_death_signal})", file=sys.stderr)
    try:
        # Deprecation warnings Airflow emits while we load it would bury the one line that says
        # why we refuse to start; they come back once the job runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from safe_scheduler import preflight

            component, args, settings = preflight.prepare(name, argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exitcodes.USAGE)
    parent.tell(settings.child_stop_timeout)

    from safe_scheduler import compat, runner, shutdown

    compat.print_banner()
    result: dict[str, int] = {}

    def job() -> None:
        result["code"] = runner.run(component, args, settings, parent)

    try:
        compat.run_with_daemon_option(args, compat.with_providers_configuration(job), component.daemon_name,
                                      **component.daemon_options(args))
    except BaseException as exc:  # noqa: BLE001 - e.g. "already running" from the daemon pidfile
        if "code" not in result:
            result["code"] = shutdown.code_of(exc)
            if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                print(f"{component.prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    shutdown.leave(result.get("code", exitcodes.FAILED))

"""``airflow-safe-scheduler``, ``airflow-safe-triggerer``, ``airflow-safe-dag-processor``: the flags
of the installed ``airflow scheduler`` / ``triggerer`` / ``dag-processor``, plus ours.

Everything that can be wrong before the job starts (a flag, a setting, a port, the database) ends
here with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import NoReturn

from safe_scheduler import __version__, components, exitcodes
from safe_scheduler.component import Component
from safe_scheduler.settings import UsageError

PROG = "airflow-safe-scheduler"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; an operator reading a supervisor log wants the line.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser(component: Component | None = None) -> argparse.ArgumentParser:
    from safe_scheduler import compat

    component = component or components.get("scheduler")
    name = component.name
    parser = _Parser(
        prog=component.prog,
        description=(
            f"Start an Airflow {name} that can crash but never hang: on any failure or signal it "
            "exits within --shutdown-timeout seconds, non-zero if it failed, leaving no child process."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Settings also come from Airflow's config, section [safe_scheduler]\n"
            "(env vars AIRFLOW__SAFE_SCHEDULER__*), shared by the safe scheduler,\n"
            "triggerer and dag-processor.\n\n"
            f"Exit codes: 0 clean stop, 1 {name} failed, 2 refused to start,\n"
            "3 forced exit after --shutdown-timeout, 4 hung (no heartbeat for --stall-timeout).\n\n"
            f"'{PROG} doctor' checks whether the installed Airflow needs one of our patches.\n\n"
            + (compat.cli_command(name).epilog or "").replace(f"airflow {name}", component.prog)
        ),
    )
    compat.add_airflow_args(parser, name)
    ours = parser.add_argument_group(f"safe {name} options")
    ours.add_argument(
        "--shutdown-timeout",
        metavar="SECONDS",
        help="Seconds from the start of shutdown (failure, signal, end of run) until the process is "
        "forced to exit. Default: [safe_scheduler] shutdown_timeout, 30.",
    )
    ours.add_argument(
        "--child-stop-timeout",
        metavar="SECONDS",
        help="Seconds a child process gets between SIGTERM and SIGKILL of its process tree. "
        "Default: [safe_scheduler] child_stop_timeout, 5.",
    )
    ours.add_argument(
        "--stall-timeout",
        metavar="SECONDS",
        help=f"Seconds without a successful heartbeat after which the {name} counts as hung and "
        "exits (code 4); 0 disables. Default: [safe_scheduler] stall_timeout, else twice "
        f"[{component.health_threshold[0]}] {component.health_threshold[1]}.",
    )
    if component.runs_tasks:
        _add_task_flags(ours)
    ours.add_argument("--version", action="store_true", help="Show the version and exit.")
    return parser


def _add_task_flags(ours: argparse._ArgumentGroup) -> None:
    ours.add_argument(
        "--task-drain-timeout",
        metavar="SECONDS",
        help="Seconds running tasks (LocalExecutor) get to finish on their own once shutdown starts, "
        "before they are sent SIGTERM. Default: [safe_scheduler] task_drain_timeout, 0.",
    )
    ours.add_argument(
        "--task-cleanup-timeout",
        metavar="SECONDS",
        help="Seconds tasks get between SIGTERM and SIGKILL to run on_kill and on_termination "
        "cleanups. Default: [safe_scheduler] task_cleanup_timeout, else what the shutdown deadline "
        "leaves after the drain and the children's stop.",
    )


def _prepare(name: str, argv: list[str] | None):
    """Parse, validate and check everything; raise UsageError with one line if anything is off."""
    try:
        from airflow.configuration import conf

        from safe_scheduler import compat
    except Exception as exc:  # noqa: BLE001 - Airflow fails at import on a broken config
        if os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "x").strip() == "":
            raise UsageError(
                "no metadata database configured: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is empty"
            ) from None
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot load Airflow ({type(exc).__name__}: {message}); "
            "check airflow.cfg and the AIRFLOW__* environment, [database] sql_alchemy_conn first"
        ) from None

    from safe_scheduler import preflight, settings

    component = components.get(name)
    warnings.simplefilter("ignore")  # again: importing Airflow 2.x installs its own warning filters
    args = build_parser(component).parse_args(argv)
    if args.version:
        print(f"{component.prog} {__version__} (Apache Airflow {compat.AIRFLOW_VERSION})")
        raise SystemExit(exitcodes.OK)
    if compat.wants_hot_reload(args):
        raise UsageError(f"--dev (hot reload) is for development; use 'airflow {component.name} --dev' for that")
    config = settings.load(
        {
            "shutdown_timeout": args.shutdown_timeout,
            "child_stop_timeout": args.child_stop_timeout,
            "stall_timeout": args.stall_timeout,
            "task_drain_timeout": getattr(args, "task_drain_timeout", None),
            "task_cleanup_timeout": getattr(args, "task_cleanup_timeout", None),
        },
        conf,
        component.health_threshold,
        component.name,
    )
    component.check(args)
    preflight.check_metadata_db(conf)
    for server in component.servers(args):
        preflight.check_port_free(server.host, server.port, server.key)
    if config.enable_health_check:
        key = f"[{settings.SECTION}] {settings.health_port_key(component.name)}"
        preflight.check_port_free(config.health_check_server_host, config.health_check_server_port, key)
    return component, args, config


def _unforeseen(exc: BaseException, name: str) -> UsageError:
    """Anything we did not foresee before start is still one line and exit 2, never a traceback."""
    text = str(exc).strip()
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return UsageError(
        f"could not prepare the {name}: {type(exc).__name__}: "
        f"{text.splitlines()[0] if text else 'no message'}{at}"
    )


def main(argv: list[str] | None = None, name: str = "scheduler") -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from safe_scheduler import doctor

        sys.exit(doctor.main(argv[1:]))
    from safe_scheduler import reaper

    try:
        reaper.follow_parent()
    except OSError as exc:
        print(f"airflow-safe-{name}: warning: no death signal from the parent (prctl: {exc})", file=sys.stderr)
    prog = f"airflow-safe-{name}"
    try:
        # Deprecation warnings Airflow emits while we load it would bury the one line that says
        # why we refuse to start; they come back once the job runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                component, args, config = _prepare(name, argv)
            except (UsageError, SystemExit, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - see _unforeseen
                raise _unforeseen(exc, name) from None
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exitcodes.USAGE)

    from safe_scheduler import compat, runner, shutdown

    compat.print_banner()
    result: dict[str, int] = {}

    def job() -> None:
        result["code"] = runner.run(component, args, config)

    try:
        compat.run_with_daemon_option(args, compat.with_providers_configuration(job), name)
    except BaseException as exc:  # noqa: BLE001 - e.g. "already running" from the daemon pidfile
        if "code" not in result:
            result["code"] = shutdown.code_of(exc)
            if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                print(f"{component.prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    shutdown.leave(result.get("code", exitcodes.FAILED))

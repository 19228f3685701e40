"""The flags of ``airflow-safe-<component>``: the installed ``airflow <component>`` command's own,
built from Airflow's CLI definition, plus ours. Each of ours keeps the name of its setting."""

from __future__ import annotations

import argparse
from typing import NoReturn

from safe_scheduler import compat
from safe_scheduler.component import Component
from safe_scheduler.settings import UsageError

PROG = "airflow-safe-scheduler"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; an operator reading a supervisor log wants the line.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser(component: Component) -> argparse.ArgumentParser:
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
    ours.add_argument(
        "--db-wait-timeout",
        metavar="SECONDS",
        help="Seconds to wait at start for a metadata database that does not answer (refused, timed "
        "out, a name that does not resolve), polling every second, before refusing to start (code 2); "
        "0 refuses at once. Default: [safe_scheduler] db_wait_timeout, 600.",
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


def overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """Our flags' values, by setting name (``settings.load``): each flag is its setting's name."""
    keys = ("shutdown_timeout", "child_stop_timeout", "stall_timeout", "task_drain_timeout", "task_cleanup_timeout",
            "db_wait_timeout")
    return {key: getattr(args, key, None) for key in keys}

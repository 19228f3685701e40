"""The flags of ``airflow-safe-<component>``: the installed ``airflow <component>`` command's own,
built from Airflow's CLI definition, plus ours. Each of ours keeps the name of its setting."""

from __future__ import annotations

import argparse
from typing import NoReturn

from safe_scheduler import compat
from safe_scheduler.component import Component
from safe_scheduler.settings import DEFAULTS, UsageError

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
            "triggerer, dag-processor and celery-worker.\n\n"
            f"Exit codes: 0 clean stop, 1 {name} failed, 2 refused to start,\n"
            f"3 forced exit after --shutdown-timeout, 4 hung (no {component.progress}\n"
            "for --stall-timeout).\n\n"
            f"'{PROG} doctor' checks whether the installed Airflow needs one of our patches.\n\n"
            + (component.airflow_command().epilog or "").replace(component.stock, component.prog)
        ),
    )
    compat.add_airflow_args(parser, component.airflow_command())
    ours = parser.add_argument_group(f"safe {name} options")
    ours.add_argument(
        "--shutdown-timeout",
        metavar="SECONDS",
        help="Seconds from the start of shutdown (failure, signal, end of run) until the process is "
        f"forced to exit. Default: [safe_scheduler] shutdown_timeout, {_default(component, 'shutdown_timeout')}.",
    )
    ours.add_argument(
        "--child-stop-timeout",
        metavar="SECONDS",
        help="Seconds a child process gets between SIGTERM and SIGKILL of its process tree. "
        "Default: [safe_scheduler] child_stop_timeout, 5.",
    )
    if component.health_threshold is not None:
        stall_default = "twice [{}] {}".format(*component.health_threshold)
    else:
        stall_default = f"{component.defaults['stall_timeout']:g}"
    ours.add_argument(
        "--stall-timeout",
        metavar="SECONDS",
        help=f"Seconds without any {component.progress} after which the {name} counts as hung and "
        f"exits (code 4); 0 disables. Default: [safe_scheduler] stall_timeout, else {stall_default}.",
    )
    ours.add_argument(
        "--db-wait-timeout",
        metavar="SECONDS",
        help="Seconds to wait at start for a metadata database "
        + ("or a Celery broker " if component.check_broker is not None else "")
        + "that does not answer (refused, timed "
        "out, a name that does not resolve), polling every second, before refusing to start (code 2); "
        "0 refuses at once. Default: [safe_scheduler] db_wait_timeout, 600.",
    )
    if component.runs_tasks:
        _add_task_flags(ours, component)
    ours.add_argument("--version", action="store_true", help="Show the version and exit.")
    return parser


def _default(component: Component, key: str) -> str:
    return f"{component.defaults.get(key, DEFAULTS[key]):g}"


def _add_task_flags(ours: argparse._ArgumentGroup, component: Component) -> None:
    if component.drains_by_default:
        drain_default = "else what --shutdown-timeout leaves after the cleanup"
        cleanup_default = f"{component.defaults['task_cleanup_timeout']:g} (or what the deadline leaves)"
    else:
        drain_default = _default(component, "task_drain_timeout")
        cleanup_default = "else what the shutdown deadline leaves after the drain and the children's stop"  # noqa: E501
    ours.add_argument(
        "--task-drain-timeout",
        metavar="SECONDS",
        help="Seconds running tasks get to finish on their own once shutdown starts, before they are "
        f"sent SIGTERM. Default: [safe_scheduler] task_drain_timeout, {drain_default}.",
    )
    ours.add_argument(
        "--task-cleanup-timeout",
        metavar="SECONDS",
        help="Seconds tasks get between SIGTERM and SIGKILL to run on_kill and on_termination "
        f"cleanups. Default: [safe_scheduler] task_cleanup_timeout, {cleanup_default}.",
    )


def overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """Our flags' values, by setting name (``settings.load``): each flag is its setting's name."""
    keys = ("shutdown_timeout", "child_stop_timeout", "stall_timeout", "task_drain_timeout", "task_cleanup_timeout",
            "db_wait_timeout")
    return {key: getattr(args, key, None) for key in keys}

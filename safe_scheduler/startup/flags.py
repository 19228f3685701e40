"""The flags of ``airflow-safe-<component>``: the installed ``airflow <component>`` command's own,
built from Airflow's CLI definition, plus ours. Each of ours is named as its setting
(``settings.SECONDS``), and its help reads the setting's default from there."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from safe_scheduler.base import compat, exitcodes
from safe_scheduler.base.errors import UsageError
from safe_scheduler.components.base import Component
from safe_scheduler.startup import settings
from safe_scheduler.startup.settings import SECTION, TASK_KEYS, default_words, flag_of

#: What each of our flags means, in ``--help``; its default is added from the settings.
MEANINGS = {
    "shutdown_timeout": "Seconds from the start of shutdown (failure, signal, end of run) until the process is "
                        "forced to exit.",
    "child_stop_timeout": "Seconds a child process gets between SIGTERM and SIGKILL of its process tree.",
    "stall_timeout": "Seconds without any {progress} after which the {name} counts as hung and exits (code 4); "
                     "0 disables.",
    "task_drain_timeout": "Seconds running tasks get to finish on their own once shutdown starts, before they are "
                          "sent SIGTERM.",
    "task_cleanup_timeout": "Seconds tasks get between SIGTERM and SIGKILL to run on_kill and on_termination "
                            "cleanups.",
    "orphaned_task_timeout": "Seconds running tasks go on, to finish and report their own state, after the {name} "
                             "ended unplanned (its parent or its job killed), before they are stopped.",
    "db_wait_timeout": "Seconds to wait at start for a metadata database {broker}that does not answer (refused, "
                       "timed out, a name that does not resolve), polling every second, before refusing to start "
                       "(code 2); 0 refuses at once.",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; an operator reading a supervisor log wants the line.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser(component: Component, conf: Any = None) -> argparse.ArgumentParser:
    name = component.name
    parser = _Parser(
        prog=component.prog,
        description=(
            f"Start an Airflow {name} that can crash but never hang: on any failure or signal it "
            "exits within --shutdown-timeout seconds, non-zero if it failed, leaving no child process."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Settings also come from Airflow's config, section [{SECTION}]\n"
            f"(env vars AIRFLOW__{SECTION.upper()}__*), shared by the safe commands.\n\n"
            f"Exit codes: {exitcodes.OK} clean stop, {exitcodes.FAILED} {name} failed, {exitcodes.USAGE} refused "
            f"to start,\n{exitcodes.FORCED} forced exit after --shutdown-timeout, {exitcodes.STALLED} hung (no "
            f"{component.job.progress}\nfor --stall-timeout).\n\n"
            "'airflow-safe-scheduler doctor' checks whether the installed Airflow needs one of our patches.\n\n"
            + (component.airflow_command().epilog or "").replace(component.stock, component.prog)
        ),
    )
    compat.add_airflow_args(parser, component.airflow_command())
    ours = parser.add_argument_group(f"safe {name} options")
    broker = "".join(f"or {c.waits_for} " for c in component.capabilities if c.waits_for)
    for key in settings.SECONDS:
        if key in TASK_KEYS and component.tasks is None:
            continue
        meaning = MEANINGS[key].format(progress=component.job.progress, name=name, broker=broker)
        ours.add_argument(flag_of(key), metavar="SECONDS", help=f"{meaning} Default: [{SECTION}] {key}, "
                          f"else {default_words(component, key, conf)}.")
    ours.add_argument("--version", action="store_true", help="Show the version and exit.")
    return parser


def overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """Our flags' values, by setting name (``settings.load``): each flag is its setting's name."""
    return {key: getattr(args, key, None) for key in settings.SECONDS}

"""``airflow triggerer``: runs deferred tasks' triggers (from Airflow 3 in a runner subprocess).

What differs per Airflow release here: ``--queues`` and ``--team-name`` (3.2+), how secrets
masking is turned on (3.x's SDK masker, 2.x's setting), and the runner's arguments.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from safe_scheduler.base import compat
from safe_scheduler.base.errors import UsageError
from safe_scheduler.components.base import Component, Job, Server


def check(args: argparse.Namespace) -> None:
    """What ``airflow triggerer`` refuses from its flags and config (3.x: ``--queues``, ``--team-name``;
    a team that does not exist fails its job as in stock)."""
    from airflow.configuration import conf

    if getattr(args, "queues", None) and not conf.getboolean("triggerer", "queues_enabled", fallback=False):
        raise UsageError("--queues option may only be used when [triggerer] queues_enabled is True")
    if getattr(args, "team_name", None) and not conf.getboolean("core", "multi_team", fallback=False):
        raise UsageError("--team-name option may only be used when [core] multi_team is enabled")


def prepare(args: argparse.Namespace) -> None:
    """Secrets masking in the triggerer's logs, as ``airflow triggerer`` turns it on."""
    try:
        from airflow.sdk._shared.secrets_masker import SecretsMasker  # 3.x

        SecretsMasker.enable_log_masking()
    except ImportError:
        from airflow import settings as airflow_settings

        airflow_settings.MASK_SECRETS_IN_LOGS = True


def log_server_port() -> int:
    """``[logging] trigger_log_server_port``, where the triggerer serves its trigger logs."""
    from airflow.configuration import conf

    return conf.getint("logging", "trigger_log_server_port", fallback=8794)


def servers(args: argparse.Namespace) -> list[Server]:
    if args.skip_serve_logs:
        return []
    port = log_server_port()
    return [Server("serve-logs", compat.serve_logs_target(port), "", port, "[logging] trigger_log_server_port")]


def new_job_runner(args: argparse.Namespace) -> Any:
    """A ``TriggererJobRunner`` set up as the installed ``airflow triggerer`` sets it up."""
    from airflow.configuration import conf
    from airflow.jobs.job import Job
    from airflow.jobs.triggerer_job_runner import TriggererJobRunner

    kwargs: dict[str, Any] = {
        "job": Job(heartrate=conf.getfloat("triggerer", "JOB_HEARTBEAT_SEC")),
        "capacity": args.capacity,
    }
    accepted = inspect.signature(TriggererJobRunner.__init__).parameters
    if "queues" in accepted:  # 3.2+
        kwargs["queues"] = set(args.queues) if getattr(args, "queues", None) else None
    if "team_name" in accepted:
        kwargs["team_name"] = getattr(args, "team_name", None)
    return TriggererJobRunner(**kwargs)


COMPONENT = Component(
    name="triggerer",
    health_port=8976,
    job=Job(new_job_runner, ("triggerer", "triggerer_health_check_threshold"), prepare=prepare),
    servers=servers,
    check=check,
)

"""``airflow scheduler``: the job that schedules and runs tasks through its executors."""

from __future__ import annotations

import argparse

from safe_scheduler import compat
from safe_scheduler.component import Component, Server
from safe_scheduler.settings import UsageError


def _check(args: argparse.Namespace) -> None:
    if getattr(args, "only_idle", False) and args.num_runs <= 0:
        raise UsageError("--only-idle requires --num-runs to be set to a positive number")


def _servers(args: argparse.Namespace) -> list[Server]:
    servers = []
    if not args.skip_serve_logs and compat.serves_logs():
        port = compat.log_server_port()
        servers.append(Server("serve-logs", compat.serve_logs_target(), "", port, "[logging] worker_log_server_port"))
    if compat.health_check_enabled():
        host, port = compat.health_check_address()
        servers.append(Server("health-check", compat.health_check_target(), host, port,
                              "[scheduler] scheduler_health_check_server_port"))
    return servers


COMPONENT = Component(
    name="scheduler",
    job_type="SchedulerJob",
    health_threshold=("scheduler", "scheduler_health_check_threshold"),
    new_job_runner=compat.new_scheduler_runner,
    servers=_servers,
    check=_check,
    executors=compat.executors,
)

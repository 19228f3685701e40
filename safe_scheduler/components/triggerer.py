"""``airflow triggerer``: runs deferred tasks' triggers (from Airflow 3 in a runner subprocess)."""

from __future__ import annotations

import argparse

from safe_scheduler import compat
from safe_scheduler.component import Component, Server


def _servers(args: argparse.Namespace) -> list[Server]:
    if args.skip_serve_logs:
        return []
    port = compat.trigger_log_server_port()
    return [Server("serve-logs", compat.serve_logs_target(port), "", port, "[logging] trigger_log_server_port")]


COMPONENT = Component(
    name="triggerer",
    job_type="TriggererJob",
    health_threshold=("triggerer", "triggerer_health_check_threshold"),
    new_job_runner=compat.new_triggerer_runner,
    servers=_servers,
    check=compat.check_triggerer_args,
    prepare=compat.prepare_triggerer,
)

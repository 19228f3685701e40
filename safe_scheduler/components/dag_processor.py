"""``airflow dag-processor``: parses DAG files in child processes (standalone on 2.x only)."""

from __future__ import annotations

import argparse

from safe_scheduler import compat
from safe_scheduler.component import Component, Server


def _servers(args: argparse.Namespace) -> list[Server]:
    return []


COMPONENT = Component(
    name="dag-processor",
    job_type="DagProcessorJob",
    health_threshold=("dag_processor", "health_check_threshold"),
    new_job_runner=compat.new_dag_processor_runner,
    servers=_servers,
    check=compat.check_dag_processor_args,
    prepare=compat.prepare_dag_processor,
)

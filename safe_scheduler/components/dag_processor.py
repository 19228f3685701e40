"""``airflow dag-processor``: parses DAG files in child processes (standalone on 2.x only)."""

from __future__ import annotations

from safe_scheduler import compat
from safe_scheduler.component import Component

COMPONENT = Component(
    name="dag-processor",
    job_type="DagProcessorJob",
    health_threshold=("dag_processor", "health_check_threshold"),
    new_job_runner=compat.new_dag_processor_runner,
    check=compat.check_dag_processor_args,
    prepare=compat.prepare_dag_processor,
)

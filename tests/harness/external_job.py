"""A DAG whose tasks each start a job on an external service (``jobservice``) and cancel it in an
``on_termination`` cleanup: what is left running elsewhere when a task is stopped."""

from __future__ import annotations

import textwrap

EXTERNAL_JOB_DAG = """
    import json
    import os
    import time
    import urllib.request
    from datetime import datetime, timedelta

    try:
        from airflow.providers.standard.operators.python import PythonOperator
        from airflow.sdk import DAG
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.operators.python import PythonOperator

    from safe_scheduler.tasks import on_termination

    SERVICE = {service!r}
    MODE = {mode!r}


    def call(method, path):
        data = b"" if method == "POST" else None
        request = urllib.request.Request(SERVICE + path, method=method, data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{{}}")


    def cancel(job_id):
        call("POST", f"/jobs/{{job_id}}/cancel")


    def tick_until_killed(job_id):
        while True:  # a cleanup that takes all the time it is given: its ticks say how long
            call("POST", f"/jobs/{{job_id}}/tick")
            time.sleep(0.1)


    def run_job():
        call("POST", f"/pids/{{os.getpid()}}")  # the task process, for a test that watches it end
        with on_termination(timeout=60) as stop:
            job = call("POST", "/jobs")["id"]
            stop.add(cancel, job)
            if MODE == "ticking-cleanup":
                stop.add(tick_until_killed, job)
            while call("GET", f"/jobs/{{job}}")["state"] == "running":
                time.sleep(0.2)
            raise RuntimeError(f"job {{job}} was cancelled")


    with DAG("external_job", schedule="@once", start_date=datetime(2026, 1, 1), catchup=False,
             default_args={{"retries": 1, "retry_delay": timedelta(seconds=1)}}):
        for n in range({tasks}):
            PythonOperator(task_id=f"job_{{n}}", python_callable=run_job)
"""


def write_dag(dags_folder, service_url: str, mode: str = "wait", tasks: int = 1) -> None:
    """The DAG: ``tasks`` tasks, each starting one external job and waiting for it."""
    (dags_folder / "external_job.py").write_text(textwrap.dedent(EXTERNAL_JOB_DAG.format(service=service_url, mode=mode, tasks=tasks)))

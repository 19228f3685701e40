"""The triggerer and the dag-processor (and the scheduler, by its job type): what each needs to
run, whether its job heartbeats, and starting it until it is up."""

from __future__ import annotations

import textwrap

from harness.procs import wait_for
from safe_scheduler.base import compat

COMPONENTS = ["triggerer", "dag-processor"]
JOB_TYPE = {"scheduler": "SchedulerJob", "triggerer": "TriggererJob", "dag-processor": "DagProcessorJob"}

# ``[logging] logging_config_class`` with a log-shipping handler, as users configure one: the handler
# keeps a non-daemon thread for its batches. Airflow loads it in every component.
LEAKY_LOGGING = """
    import copy
    import logging
    import threading

    from airflow.config_templates.airflow_local_settings import DEFAULT_LOGGING_CONFIG


    class ShippingHandler(logging.Handler):
        def __init__(self):
            super().__init__()
            threading.Thread(target=threading.Event().wait, name="log-shipper", daemon=False).start()

        def emit(self, record):
            pass


    LOGGING_CONFIG = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    LOGGING_CONFIG["handlers"]["shipper"] = {"class": "leaky_logging.ShippingHandler"}
    LOGGING_CONFIG["root"]["handlers"].append("shipper")
"""

# A DAG file that takes ten minutes to import: the dag-processor's parsing process for it stays.
SLOW_DAG = """
    import time

    time.sleep(600)  # airflow DAG
"""


# A DAG file to parse: stock 2.x's dag-processor crashes on an empty DAG folder (see compat).
SIMPLE_DAG = """
    from datetime import datetime

    try:
        from airflow.sdk import DAG
    except ImportError:  # Airflow 2
        from airflow import DAG

    with DAG("simple", schedule=None, start_date=datetime(2026, 1, 1)):
        pass
"""


def prepare(deployment, name: str) -> None:
    """What the component needs to run at all: on 2.x the dag-processor runs only standalone."""
    if name == "dag-processor":
        if compat.airflow_has_key("scheduler", "standalone_dag_processor"):  # 2.x only; 3.x has no such key
            deployment.env["AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR"] = "True"
        (deployment.home / "dags" / "simple.py").write_text(textwrap.dedent(SIMPLE_DAG))


def heartbeating(postgres, proc, name: str):
    """A condition: the component's job has recorded a heartbeat after its start."""

    def condition() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{name} exited early with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
        return postgres.execute(
            f"SELECT count(*) FROM job WHERE job_type = '{JOB_TYPE[name]}' AND state = 'running'"
            " AND latest_heartbeat > start_date"
        )[0][0] > 0

    return condition


def started_component(deployment, postgres, name: str, *args: str, stock: bool = False, own_session: bool = False,
                      **env: str):
    """The component, up: heartbeating, and its children there (serve-logs; parsing processes)."""
    prepare(deployment, name)
    proc = deployment.component(name, *args, stock=stock, own_session=own_session, **env)
    wait_for(heartbeating(postgres, proc, name), 120, interval=0.5, message=f"a {name} heartbeat")
    if name == "triggerer":
        wait_for(lambda: proc.listening_on(deployment.trigger_log_port), 60, message="serve-logs to listen")
    return proc


def with_parsing_process(deployment):
    """A DAG file whose import never ends, so that the dag-processor keeps a parsing process."""
    (deployment.home / "dags" / "slow_dag.py").write_text(textwrap.dedent(SLOW_DAG))


def wait_parsing(proc) -> None:
    # Any process below the job process: the dag-processor has no servers, so it parses.
    wait_for(proc.below_job, 120, interval=0.5,
             message="a DAG-file parsing process")


def started_after(postgres, name: str, since: float) -> float | None:
    """Wall-clock time at which a job of component ``name`` first started after ``since`` (a
    ``time.time()``): its job row's ``start_date``, its first heartbeat. None while there is none."""
    found = postgres.execute(
        f"SELECT min(extract(epoch FROM start_date)) FROM job WHERE job_type = '{JOB_TYPE[name]}'"
        f" AND start_date > to_timestamp({since})"
    )[0][0]
    return None if found is None else float(found)

"""The triggerer and the dag-processor under the same faults as the scheduler, stock beside safe.

Each test starts ``airflow-safe-triggerer`` / ``airflow-safe-dag-processor`` (their console scripts)
or stock ``airflow triggerer`` / ``airflow dag-processor`` against a real PostgreSQL server, waits
for the job's heartbeat in the database, injects a fault, and checks from outside: exit code, time
from fault to exit, and that no process it started is still alive.
"""

from __future__ import annotations

import signal
import textwrap
import time

import pytest

from procs import wait_for
from safe_scheduler import compat
from test_faults import HANGING_SHUTDOWN_PLUGIN, MARGIN, assert_exits, assert_no_orphans, kill
from test_hung import statsd  # noqa: F401 - a fixture

pytestmark = pytest.mark.all_versions

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


def started(deployment, postgres, name: str, *args: str, stock: bool = False, **env: str):
    """The component, up: heartbeating, and its children there (serve-logs; parsing processes)."""
    prepare(deployment, name)
    proc = deployment.component(name, *args, stock=stock, **env)
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


@pytest.mark.parametrize("name", COMPONENTS)
def test_db_stopped_exits_nonzero_without_orphans(deployment, postgres, name):
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = started(deployment, postgres, name, "--shutdown-timeout", "20")
    if name == "dag-processor":
        wait_parsing(proc)

    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(proc, fault, 20 + MARGIN)
    assert code == 1, proc.log()[-4000:]
    assert took < 20, f"exit took {took:.1f}s; the deadline is 20s"
    assert_no_orphans(proc)


@pytest.mark.parametrize("name", COMPONENTS)
def test_db_stopped_with_a_logging_thread(deployment, postgres, name):
    """A log-shipping handler's non-daemon thread: stock waits for it forever; we name it and go."""
    (deployment.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
    proc = started(deployment, postgres, name, "--shutdown-timeout", "60",
                   AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS="leaky_logging.LOGGING_CONFIG")

    postgres.stop("immediate")
    fault = time.monotonic()
    code, took = assert_exits(proc, fault, 60 + MARGIN)
    assert code == 1, proc.log()[-4000:]
    assert took < 30, f"took {took:.1f}s"  # not the 60 s deadline: the cause is known
    assert "log-shipper" in proc.log()
    assert_no_orphans(proc)


@pytest.mark.parametrize("name", COMPONENTS)
def test_sigterm_is_a_clean_exit(deployment, postgres, name):
    proc = started(deployment, postgres, name)
    sent = proc.signal(signal.SIGTERM)
    code, _ = assert_exits(proc, sent, 30 + MARGIN)
    assert code == 0, proc.log()[-4000:]
    assert_no_orphans(proc)


@pytest.mark.parametrize("name", COMPONENTS)
def test_sigterm_with_a_blocked_exit_is_forced(deployment, postgres, name):
    # The triggerer reaches the listener only once its trigger runner has stopped: seen taking
    # over 6 s on a loaded machine (Python 3.13), so the deadline came first, elsewhere.
    timeout = 12 if name == "triggerer" else 6
    deployment.add_plugin("blocker", HANGING_SHUTDOWN_PLUGIN)
    proc = started(deployment, postgres, name, "--shutdown-timeout", str(timeout), "--child-stop-timeout", "2")
    sent = proc.signal(signal.SIGTERM)
    code, took = assert_exits(proc, sent, timeout + MARGIN + 10)
    assert code == 3, proc.log()[-4000:]
    assert timeout <= took < timeout + MARGIN, f"took {took:.1f}s"
    assert "hang_in_before_stopping" in proc.log(), proc.log()[-8000:]
    assert_no_orphans(proc)


@pytest.mark.parametrize("target", ["top", "job"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_sigkill_leaves_no_child(deployment, postgres, name, target):
    """The triggerer's serve-logs (and trigger runner, 3.x); the dag-processor's parsing process.
    (A triggerer SIGKILLed with a trigger running: ``test_deferrable.py``.)"""
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = started(deployment, postgres, name)
    if name == "dag-processor":
        wait_parsing(proc)
    assert proc.below_job()
    kill(proc, target)
    assert_no_orphans(proc, timeout=30 + MARGIN)


@pytest.mark.parametrize("name", COMPONENTS)
def test_frozen_db_is_a_stall(deployment, postgres, statsd, name):  # noqa: F811
    proc = started(deployment, postgres, name, "--stall-timeout", "10", "--shutdown-timeout", "8",
                   "--child-stop-timeout", "2", **statsd.env)
    postgres.freeze()
    fault = time.monotonic()
    code, took = assert_exits(proc, fault, 10 + 8 + MARGIN + 10)
    assert code == 4, proc.log()[-4000:]
    assert took < 10 + 8 + MARGIN, f"took {took:.1f}s"
    assert f"{name.capitalize()} is hung" in proc.log()
    assert_no_orphans(proc)
    metric = name.replace("-", "_")  # the metrics say which component they come from
    wait_for(lambda: statsd.has(rf"^airflow\.safe_{metric}\.stalls:1\|c"), 5, message=f"safe_{metric}.stalls")


# -- The same faults under stock Airflow: the tests above can tell the difference. ----------------


@pytest.mark.parametrize("name", COMPONENTS)
def test_stock_with_a_logging_thread_never_exits(deployment, postgres, name):
    (deployment.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
    proc = started(deployment, postgres, name, stock=True,
                   AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS="leaky_logging.LOGGING_CONFIG")
    postgres.stop("immediate")
    assert proc.wait_exit(30) is None, f"stock {name} exited: the scenario no longer reproduces"


@pytest.mark.parametrize("name", COMPONENTS)
def test_stock_sigkill_leaves_children(deployment, postgres, name):
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = started(deployment, postgres, name, stock=True)
    if name == "dag-processor":
        wait_parsing(proc)

    proc.signal(signal.SIGKILL)
    assert proc.wait_exit(10) == -signal.SIGKILL
    time.sleep(3)  # a grace period for the kernel, not an assertion: orphans are counted after it
    assert proc.survivors(), f"stock {name} left nothing: the scenario no longer reproduces"

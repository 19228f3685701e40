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

from harness.components import COMPONENTS, LEAKY_LOGGING, started_component, wait_parsing, with_parsing_process
from harness.faults import HANGING_SHUTDOWN_PLUGIN, MARGIN, assert_exits, assert_no_orphans, kill
from harness.procs import wait_for

pytestmark = pytest.mark.all_versions

@pytest.mark.parametrize("name", COMPONENTS)
def test_db_stopped_exits_nonzero_without_orphans(deployment, postgres, name):
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = started_component(deployment, postgres, name, "--shutdown-timeout", "20")
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
    proc = started_component(deployment, postgres, name, "--shutdown-timeout", "60",
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
    proc = started_component(deployment, postgres, name)
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
    proc = started_component(deployment, postgres, name, "--shutdown-timeout", str(timeout), "--child-stop-timeout", "2")
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
    proc = started_component(deployment, postgres, name)
    if name == "dag-processor":
        wait_parsing(proc)
    assert proc.below_job()
    kill(proc, target)
    assert_no_orphans(proc, timeout=30 + MARGIN)


@pytest.mark.parametrize("name", COMPONENTS)
def test_frozen_db_is_a_stall(deployment, postgres, statsd, name):  # noqa: F811
    proc = started_component(deployment, postgres, name, "--stall-timeout", "10", "--shutdown-timeout", "8",
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


@pytest.mark.stock
@pytest.mark.parametrize("name", COMPONENTS)
def test_stock_with_a_logging_thread_never_exits(deployment, postgres, name):
    (deployment.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
    proc = started_component(deployment, postgres, name, stock=True,
                   AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS="leaky_logging.LOGGING_CONFIG")
    postgres.stop("immediate")
    assert proc.wait_exit(30) is None, f"stock {name} exited: the scenario no longer reproduces"


@pytest.mark.parametrize("name", COMPONENTS)
def test_stock_sigkill_leaves_children(deployment, postgres, name):
    if name == "dag-processor":
        with_parsing_process(deployment)
    proc = started_component(deployment, postgres, name, stock=True)
    if name == "dag-processor":
        wait_parsing(proc)

    proc.signal(signal.SIGKILL)
    assert proc.wait_exit(10) == -signal.SIGKILL
    time.sleep(3)  # a grace period for the kernel, not an assertion: orphans are counted after it
    assert proc.survivors(), f"stock {name} left nothing: the scenario no longer reproduces"

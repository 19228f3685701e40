"""Deferred tasks, end to end: a real task defers, the safe triggerer runs its trigger, it resumes.

A safe scheduler runs the task (on Airflow 3 beside a real api-server and dag-processor); the task
writes a mark each time its code runs, so "exactly once" is counted from the task's own side
effects, not from Airflow's state.
"""

from __future__ import annotations

import signal
import textwrap
import time

import pytest

from harness.faults import MARGIN, assert_exits, assert_no_orphans, kill
from harness.procs import wait_for

DEFERRING_DAG = """
    import os
    from datetime import datetime, timedelta, timezone

    try:
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger
        from airflow.sdk import DAG, BaseOperator
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.models import BaseOperator
        from airflow.triggers.temporal import DateTimeTrigger

    MARKS = {marks!r}


    def mark(what):
        with open(os.path.join(MARKS, what), "a") as marks:
            marks.write(f"{{os.getpid()}}\\n")


    class WaitThenResume(BaseOperator):
        def execute(self, context):
            mark("execute")
            moment = datetime.now(timezone.utc) + timedelta(seconds={wait})
            self.defer(trigger=DateTimeTrigger(moment=moment), method_name="resume")

        def resume(self, context, event=None):
            mark("resume")


    with DAG("deferred", schedule="@once", start_date=datetime(2026, 1, 1), catchup=False):
        WaitThenResume(task_id="wait")
"""

# A trigger whose ``run`` blocks its event loop for good: a synchronous call in async code.
BLOCKING_TRIGGER = """
    import time

    from airflow.triggers.base import BaseTrigger, TriggerEvent


    class BlockingTrigger(BaseTrigger):
        def serialize(self):
            return ("blocking_trigger.BlockingTrigger", {})

        async def run(self):
            time.sleep(3600)
            yield TriggerEvent(None)
"""

BLOCKED_DAG = """
    from datetime import datetime

    from airflow.sdk import DAG, BaseOperator

    from blocking_trigger import BlockingTrigger


    class Blocked(BaseOperator):
        def execute(self, context):
            self.defer(trigger=BlockingTrigger(), method_name="resume")

        def resume(self, context, event=None):
            pass


    with DAG("blocked", schedule="@once", start_date=datetime(2026, 1, 1), catchup=False):
        Blocked(task_id="blocked")
"""


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _with_scheduler(deployment):
    deployment.env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
    deployment.start_task_services()
    scheduler = deployment.scheduler()
    scheduler.wait_healthy()
    return scheduler


def _trigger_taken(postgres):
    return lambda: postgres.execute("SELECT count(*) FROM trigger WHERE triggerer_id IS NOT NULL")[0][0] > 0


@pytest.mark.all_versions
def test_deferred_task_completes_once_across_a_killed_triggerer(deployment, postgres, tmp_path):
    """The safe triggerer takes the trigger; SIGKILLed mid-deferral it leaves no child; a new one
    takes the trigger over once the old one's heartbeat is stale, and the task resumes, once."""
    marks = tmp_path / "marks"
    marks.mkdir()
    dag = DEFERRING_DAG.format(marks=str(marks), wait=45)
    (deployment.home / "dags" / "deferred.py").write_text(textwrap.dedent(dag))
    _with_scheduler(deployment)
    triggerer = deployment.component("triggerer")

    wait_for(lambda: _lines(marks / "execute"), 240, interval=0.5, message="the task to run and defer")
    wait_for(_trigger_taken(postgres), 120, interval=0.5, message="the triggerer to take the trigger")
    assert triggerer.below_job(), "the triggerer has no child (serve-logs, trigger runner)"
    assert _lines(marks / "resume") == 0, "resumed before the triggerer was killed: make the wait longer"

    kill(triggerer, "job")  # the job process itself, as the OOM killer would: no shutdown of its own
    assert_no_orphans(triggerer, timeout=10)

    again = deployment.component("triggerer")

    def succeeded() -> bool:
        return postgres.execute("SELECT state FROM task_instance WHERE dag_id = 'deferred'") == [("success",)]

    try:
        wait_for(succeeded, 300, interval=1, message="the deferred task to succeed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; triggerer log:\n{again.log()[-3000:]}") from None
    assert _lines(marks / "execute") == 1
    assert _lines(marks / "resume") == 1

    sent = again.signal(signal.SIGTERM)
    code, _ = assert_exits(again, sent, 30 + MARGIN)
    assert code == 0, again.log()[-4000:]
    assert_no_orphans(again)


def test_stalled_trigger_runner_is_a_stall(deployment, postgres):
    """Airflow (3.2.2+) stops the heartbeat when the trigger runner goes silent for
    ``runner_health_check_threshold`` and then stays alive forever (#65286); the safe triggerer
    exits 4 within that threshold + stall_timeout + shutdown_timeout."""
    deployment.add_plugin("blocking_trigger", BLOCKING_TRIGGER)
    (deployment.home / "dags" / "blocked.py").write_text(textwrap.dedent(BLOCKED_DAG))
    _with_scheduler(deployment)
    threshold, stall, shutdown = 5, 10, 8
    triggerer = deployment.component(
        "triggerer", "--stall-timeout", str(stall), "--shutdown-timeout", str(shutdown),
        "--child-stop-timeout", "2", AIRFLOW__TRIGGERER__RUNNER_HEALTH_CHECK_THRESHOLD=str(threshold),
    )
    wait_for(_trigger_taken(postgres), 240, interval=0.5, message="the triggerer to take the blocking trigger")
    taken = time.monotonic()

    code, took = assert_exits(triggerer, taken, threshold + stall + shutdown + MARGIN + 10)
    assert code == 4, triggerer.log()[-4000:]
    assert took < threshold + stall + shutdown + MARGIN, f"took {took:.1f}s"
    assert "event loop appears deadlocked" in triggerer.log()
    assert_no_orphans(triggerer)

"""A database that does not answer at start is waited for (``dbwait``), against real PostgreSQL:
the process stays alive and says so, starts within a second or two of the database's return,
ends at once on SIGTERM, and still refuses a database that answers wrong.

The outage under a supervisor's restarts is the kubelet's (``harness.restarts``): the shortest
outage here, the longer ones and the other supervisors in the bench (``bench/sections/outages.py``).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from harness.components import started_after
from harness.faults import MARGIN, assert_exits, assert_no_orphans
from harness.procs import wait_for
from harness.restarts import Kubelet, Restarted

#: What a loaded 2-core machine may add to "within 2 s of the database's return".
LOAD_SLACK = 3.0


def _endpoint(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return dict(json.loads(resp.read()), code=resp.status)
    except OSError:
        return {}


def _waiting(proc, port: int):
    def condition() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"exited with {proc.popen.returncode} instead of waiting:\n{proc.log()[-3000:]}")
        return _endpoint(port).get("status") == "waiting for the metadata database"

    return condition


@pytest.mark.all_versions
def test_waits_for_the_database_says_so_and_ends_at_once_on_sigterm(deployment, postgres):
    postgres.stop("immediate")
    port = deployment.endpoint_port("scheduler")
    proc = deployment.scheduler()
    wait_for(_waiting(proc, port), 60, interval=0.2, message="the endpoint to say it is waiting")
    assert _endpoint(port)["code"] == 200  # a probe passes: restarting would not help
    sent = proc.signal(signal.SIGTERM)
    code, took = assert_exits(proc, sent, 5)
    assert code == 0, proc.log()[-3000:]
    assert took < 2, f"{took:.1f}s"
    assert_no_orphans(proc)
    assert not _endpoint(port)


def test_wrong_database_refused_at_once_and_the_wait_runs_out(deployment, postgres):
    """A database that answers "no" is never waited for; one that does not answer only so long."""
    wrong = deployment.scheduler(AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgres.url.rsplit("/", 1)[0] + "/nosuchdb")
    began = time.monotonic()
    code, _ = assert_exits(wrong, began, 60)
    assert code == 2 and "does not exist" in wrong.log(), wrong.log()[-3000:]
    assert "waiting" not in wrong.log()

    postgres.stop("immediate")
    out = deployment.scheduler("--db-wait-timeout", "3")
    began = time.monotonic()
    code, took = assert_exits(out, began, 60)
    assert code == 2, out.log()[-3000:]
    assert "did not answer for 3s" in out.log().splitlines()[-1], out.log()[-3000:]
    assert_no_orphans(out)


def test_outage_under_the_kubelet_back_on_the_database_return(deployment, postgres):
    """The database goes away under a running scheduler for 20 s, restarted as the kubelet does: it
    exits 1, is restarted 10 s later, waits, and starts within seconds of the return (stock's next
    try would come 20 s after its second crash)."""
    kubelet = Restarted(lambda: deployment.scheduler("--shutdown-timeout", "10"), Kubelet())
    try:
        wait_for(lambda: kubelet.runs and kubelet.current.health_status() == 200, 120, interval=0.3,
                 message="the scheduler to heartbeat")
        first = kubelet.current
        postgres.stop("immediate")
        stopped = time.monotonic()
        code, _ = assert_exits(first, stopped, 10 + MARGIN)
        assert code == 1, first.log()[-3000:]
        port = deployment.endpoint_port("scheduler")
        wait_for(lambda: len(kubelet.runs) == 2 and _waiting(kubelet.current, port)(), Kubelet.FIRST + 60,
                 interval=0.2, message="the restarted scheduler to wait")
        time.sleep(max(0.0, stopped + 20 - time.monotonic()))  # the rest of the outage
        postgres.start()
        back = time.time()
        started = wait_for(lambda: started_after(postgres, "scheduler", back), 60, interval=0.2,
                           message="a scheduler job after the return")
        print(f"first heartbeat {started - back:.2f}s after the database's return")
        assert started - back < 2 + LOAD_SLACK, f"{started - back:.1f}s"
        assert len(kubelet.runs) == 2  # it waited: no restart in between
    finally:
        kubelet.stop()

"""``airflow-safe-api-server`` (Airflow 3), tried as an operator would, with 2 uvicorn workers: a
SIGTERM with a log shipper's thread, ``kill -9`` of the PID started (a restart serves on the same
port), a route that blocks a worker's event loop, and the database frozen under load.
"""

from __future__ import annotations

import signal
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness import pg
from harness.components import LEAKY_LOGGING
from harness.faults import MARGIN, assert_exits, assert_no_orphans, kill
from harness.cli import refused, run
from harness.deployment import PYTHON, base_env
from harness.procs import health_status, http_status, wait_for
from safe_scheduler.base import compat

#: A plugin whose async route calls ``time.sleep``: the shape of #64877, one request blocks its worker's loop.
BLOCKER = """
    import time

    from fastapi import FastAPI

    from airflow.plugins_manager import AirflowPlugin

    app = FastAPI()


    @app.get("/block")
    async def block():
        time.sleep(600)


    class Blocker(AirflowPlugin):
        name = "blocker"
        fastapi_apps = [{"app": app, "url_prefix": "/blocker", "name": "blocker"}]
"""


def _started(dep, *args: str, port: int | None = None, workers: str = "2", **env: str):
    """The safe api-server, with 2 workers unless told (Airflow's default is 1), serving its own route."""
    port = port or pg.free_port()
    flags = [] if workers == "1" else ["--workers", workers]
    proc = dep.component("api-server", "--port", str(port), *flags, *args, own_session=True, **env)

    def serving() -> bool:
        assert proc.popen.poll() is None, proc.log()[-4000:]
        return http_status(f"http://127.0.0.1:{port}/api/v2/version") == 200

    wait_for(serving, 180, interval=0.5, message="the api-server to serve")
    return proc, port


def _workers(proc) -> list:
    return [p for p in proc.below_job() if "forkhook" in " ".join(p.cmdline()) or "spawn" in " ".join(p.cmdline())]


@pytest.mark.all_versions
def test_it_is_airflow_3_only(home):
    """On 2.x: one line and exit 2 (the webserver is 2.x's server); on 3.x, stock's flags."""
    done = run([str(Path(PYTHON).parent / "airflow-safe-api-server"), "--help"], base_env(home))
    if compat.AIRFLOW_VERSION.major >= 3:
        assert done.returncode == 0 and "--workers" in done.stdout, done.stderr
    else:
        assert refused(done, "airflow-safe-api-server").endswith(
            f"the api-server came with Airflow 3; this is Airflow {compat.AIRFLOW_VERSION}: run `airflow webserver`")


def test_sigterm_with_a_log_shipper_thread_exits_0_in_time(deployment):
    """A logging config whose handler keeps a non-daemon thread, in the job and in each worker."""
    dep = deployment
    (dep.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
    proc, _ = _started(dep, AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS="leaky_logging.LOGGING_CONFIG")
    sent = proc.signal(signal.SIGTERM)
    code, _ = assert_exits(proc, sent, 15 + 5)  # the default shutdown_timeout, + 5 s
    assert code == 0, proc.log()[-4000:]
    assert_no_orphans(proc)
    assert not proc.in_session()


@pytest.mark.parametrize("target", ["top", "job"])
def test_kill_9_leaves_nothing_and_a_restart_serves(deployment, target):
    """``kill -9`` of the PID started (the job stops itself) or of the server below it (the parent
    sweeps): nothing is left within child_stop_timeout + 2 s, by pid and by session, and the same
    command serves again on the same port."""
    dep = deployment
    proc, port = _started(dep)
    assert len(_workers(proc)) >= 2, [p.cmdline() for p in proc.below_job()]
    kill(proc, target)
    assert_no_orphans(proc, timeout=5 + 2)
    assert not proc.in_session()
    if target == "top":
        again, _ = _started(dep, port=port)
        assert_exits(again, again.signal(signal.SIGTERM), 15 + 5)


@pytest.mark.parametrize("workers", ["1", "2"], ids=["one-worker-default", "two-workers"])
def test_a_blocked_event_loop_is_a_stall(deployment, workers):
    """A route blocks one worker's loop: the endpoint answers 503, and the server exits 4 within
    stall_timeout + 10 s, with nothing left; with one worker (Airflow's default) the loop is the
    server's own main thread."""
    dep = deployment
    dep.add_plugin("blocker", BLOCKER)
    proc, port = _started(dep, "--stall-timeout", "20", workers=workers)
    endpoint = dep.endpoint_port("api-server")
    assert health_status(endpoint) == 200
    blocked = time.monotonic()
    threading.Thread(target=http_status, args=(f"http://127.0.0.1:{port}/blocker/block",), daemon=True).start()
    seen: set = set()
    wait_for(lambda: seen.add(health_status(endpoint)) or proc.popen.poll() is not None, 20 + 10 + MARGIN,
             interval=0.2, message="the server to exit")
    took = time.monotonic() - blocked
    assert proc.popen.returncode == 4, proc.log()[-4000:]
    assert took < 20 + 10, f"exited {took:.1f}s after the block"
    if workers == "2":  # the others' stop takes a moment, during which the endpoint says 503
        assert 503 in seen, seen
    # One worker: the process is forced out as soon as the watchdog looks, its endpoint with it.
    assert_no_orphans(proc)
    assert not proc.in_session()


def test_a_frozen_database_is_not_the_server_s_fault(deployment, postgres):
    """PostgreSQL frozen for 60 s with 40 DB-bound requests in flight: the process runs on, our
    endpoint answers 200 within 1 s throughout and says whose fault it is, and Airflow's own health
    route answers 200 within 2 s of the thaw."""
    dep = deployment
    proc, port = _started(dep)
    endpoint = dep.endpoint_port("api-server")
    health = f"http://127.0.0.1:{port}/api/v2/monitor/health"
    assert http_status(health) == 200
    postgres.freeze()
    thawed = False
    try:
        frozen = time.monotonic()
        for _ in range(40):  # DB-bound, each holds a thread of its worker's pool until the thaw
            threading.Thread(target=_get, args=(health, 120), daemon=True).start()
        bodies = []
        while time.monotonic() - frozen < 60:
            asked = time.monotonic()
            status, body = _get(f"http://127.0.0.1:{endpoint}/health", 1.0)
            assert status == 200 and time.monotonic() - asked < 1.0, (status, body, time.monotonic() - frozen)
            bodies.append(body)
            time.sleep(max(0.0, asked + 1.0 - time.monotonic()))
        assert proc.popen.poll() is None, proc.log()[-4000:]
        assert any(b"no answer" in body for body in bodies), bodies[-3:]
        postgres.thaw()
        thawed = True
        back = time.monotonic()
        wait_for(lambda: http_status(health) == 200, 2.0, interval=0.1, message="Airflow's health route after the thaw")
        wait_for(lambda: b"answering" in _get(f"http://127.0.0.1:{endpoint}/health", 1.0)[1], 2 + 2,
                 interval=0.2, message="our endpoint to see the database again")
        assert time.monotonic() - back < 4
    finally:
        if not thawed:
            postgres.thaw()
    assert proc.popen.poll() is None


def _get(url: str, timeout: float) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""

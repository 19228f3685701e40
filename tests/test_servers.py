"""Servers that die while the scheduler runs: noticed, counted, started again.

serve-logs is SIGKILLed as the OOM killer would; a stock scheduler goes on without a log server, so
a running task's log stays dark. Everything is observed from outside: who listens on the log port,
the metrics on a real statsd listener, the health check.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import textwrap
import time

import psutil
import pytest

from harness.deployment import PYTHON
from harness.faults import started_scheduler
from harness.procs import wait_for

pytestmark = pytest.mark.all_versions


def _kill_log_server(scheduler, port: int) -> int:
    """SIGKILL the scheduler's serve-logs child (the one listening on ``port``); return its pid."""
    servers = [p for p in scheduler.listening_on(port) if p.ppid() == scheduler.job_pid]
    assert len(servers) == 1, servers
    servers[0].send_signal(signal.SIGKILL)
    return servers[0].pid


def _listener_pids(scheduler, port: int) -> set[int]:
    found = set()
    for proc in scheduler.listening_on(port):
        with contextlib.suppress(psutil.NoSuchProcess):  # the killed one, gone since it was listed
            if proc.ppid() == scheduler.job_pid:
                found.add(proc.pid)
    return found


def test_killed_log_server_is_listening_again(deployment, statsd):  # noqa: F811
    scheduler = started_scheduler(deployment, **statsd.env)
    killed = _kill_log_server(scheduler, deployment.log_port)
    gone = time.monotonic()

    wait_for(lambda: _listener_pids(scheduler, deployment.log_port) - {killed}, 10,
             message="a new serve-logs listening on the log port")
    back = time.monotonic() - gone
    assert back < 10, f"{back:.1f}s"
    wait_for(lambda: statsd.has(r"safe_scheduler\.child_exited\.serve_logs:1\|c"), 5,
             message="the child_exited metric")
    assert statsd.has(r"safe_scheduler\.child_restarted\.serve_logs:1\|c")
    assert scheduler.popen.poll() is None


def test_log_server_that_cannot_come_back_does_not_stop_scheduling(deployment, statsd):  # noqa: F811
    """Its port is taken (a leftover of another scheduler, #40726): the restarts fail, are counted,
    back off, and the scheduler keeps heartbeating; once the port is free it is back."""
    scheduler = started_scheduler(deployment, **statsd.env)
    killed = _kill_log_server(scheduler, deployment.log_port)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def take_port() -> bool:
        try:
            squatter.bind(("", deployment.log_port))
        except OSError:
            return False
        squatter.listen()
        return True

    try:
        wait_for(take_port, 5, interval=0.01, message="the log port to be free to take")
        deaths = r"safe_scheduler\.child_exited\.serve_logs:1\|c"
        wait_for(lambda: sum(1 for m in list(statsd.messages) if "child_exited.serve_logs" in m) >= 3, 60,
                 message="two failed restarts after the kill")
        assert statsd.has(deaths)
        assert scheduler.health_status() == 200, "the scheduler stopped heartbeating"
        assert scheduler.popen.poll() is None
    finally:
        squatter.close()
    wait_for(lambda: _listener_pids(scheduler, deployment.log_port) - {killed}, 70,
             message="serve-logs back once the port is free")
    assert not [p for p in psutil.Process(scheduler.job_pid).children() if p.status() == psutil.STATUS_ZOMBIE]


# A job process with a pooled DB connection, and a server forked from it that uses the database, as
# Airflow's scheduler health check does on every request. What the job process's own backend last
# ran is read, before and after, through a connection outside the pool.
SERVER_WITH_DB = """
    import json
    import psycopg2
    from sqlalchemy import text
    from airflow import settings
    from airflow.utils.session import create_session
    from safe_scheduler.children import servers as children

    with create_session() as session:
        job_backend = session.execute(text("SELECT pg_backend_pid()")).scalar()
    side = psycopg2.connect(settings.engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
    side.autocommit = True

    def last_query():
        with side.cursor() as cursor:
            cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (job_backend,))
            return cursor.fetchone()[0]

    def server():
        with create_session() as session:
            session.execute(text("SELECT 'the server'")).scalar()

    before = last_query()
    child = children.ChildProcess("health-check", server)
    child.start()
    child.process.join(60)
    print(json.dumps({"before": before, "after": last_query(), "exitcode": child.process.exitcode}))
"""


def test_a_server_never_uses_the_job_process_db_connection(deployment):
    """SQLAlchemy pings a pooled connection before Airflow's pid check: a forked server pinged the
    job process's own socket and could read the reply to the job's query, which then waited forever
    (stock 2.11.2 with ``enable_health_check``: nothing scheduled for 6 minutes, seen in CI)."""
    done = subprocess.run([PYTHON, "-c", textwrap.dedent(SERVER_WITH_DB)], env=deployment.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["exitcode"] == 0, done.stderr[-3000:]
    assert seen["after"] == seen["before"], f"the server sent {seen['after']!r} on the job's connection"

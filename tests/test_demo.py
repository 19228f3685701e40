"""``scripts/demo``, the README's first command, as a new user runs it (its install is already done
here, so it skips it): its first line comes at once, the DAG run succeeds in the demo's own SQLite
database, it ends by itself with exit 0, and nothing it started is left."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time

import psutil

from harness import pg
from harness.chart import REPO


def _started_by(home: str) -> list[psutil.Process]:
    """Processes whose environment names the demo's AIRFLOW_HOME: the demo's, whoever their parent."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("AIRFLOW_HOME") == home:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_demo_runs_the_family_and_ends_by_itself(tmp_path):
    env = dict(os.environ, DEMO_HOME=str(tmp_path / "demo"))
    # Ports of their own: other tests run beside this one (the defaults are the chart tests').
    for variable in ("AIRFLOW__SAFE_SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
                     "AIRFLOW__SAFE_SCHEDULER__TRIGGERER_HEALTH_CHECK_SERVER_PORT",
                     "AIRFLOW__SAFE_SCHEDULER__DAG_PROCESSOR_HEALTH_CHECK_SERVER_PORT",
                     "AIRFLOW__SAFE_SCHEDULER__API_SERVER_HEALTH_CHECK_SERVER_PORT",
                     "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"):
        env[variable] = str(pg.free_port())
    home = str(tmp_path / "demo" / "airflow")
    seen = _Seen(home)
    started = time.monotonic()
    demo = subprocess.Popen([str(REPO / "scripts" / "demo")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        first = demo.stdout.readline()
        first_after = time.monotonic() - started
        rest, _ = demo.communicate(timeout=600)
    finally:
        seen.done = True
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert first and first_after < 2, (first_after, first)
    assert demo.returncode == 0, rest[-4000:]
    db = tmp_path / "demo" / "airflow" / "airflow.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        runs = connection.execute("SELECT state FROM dag_run WHERE dag_id = 'safe_demo'").fetchall()
        succeeded = connection.execute(
            "SELECT count(*) FROM task_instance WHERE dag_id = 'safe_demo' AND state = 'success'").fetchone()[0]
    assert runs == [("success",)], rest[-4000:]
    assert succeeded == 3  # the task, the deferred wait, the task with a cleanup
    # The wait deferred: the triggerer ran its trigger, and wrote that trigger's own log.
    logs = tmp_path / "demo" / "airflow" / "logs" / "dag_id=safe_demo"
    triggered = [f for f in logs.glob("run_id=*/task_id=deferred_wait/attempt=1.log.trigger.*.log")
                 if "starting" in f.read_text()]
    assert triggered, sorted(str(f.relative_to(logs)) for f in logs.rglob("*"))
    assert not _started_by(home), "the demo left processes behind"
    # The api-server was ours, and its port was bound to the loopback only (the admin password is printed).
    assert any("airflow-safe-api-server" in c for c in seen.commands), seen.commands
    assert not any("airflow api-server" in c for c in seen.commands), seen.commands
    assert seen.api_binds and seen.api_binds <= {"127.0.0.1"}, seen.api_binds


class _Seen:
    """What the demo's processes were, and where its api-server's port was bound, looked at each second."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.commands: set[str] = set()
        self.api_binds: set[str] = set()
        self.done = False
        threading.Thread(target=self._look, daemon=True).start()

    def _look(self) -> None:
        while not self.done:
            for proc in _started_by(self.home):
                try:
                    self.commands.add(" ".join(proc.cmdline()))
                    port = int(proc.environ().get("AIRFLOW__API__PORT") or 0)
                    # Below it too: a retitled process (setproctitle) no longer shows its environment.
                    for below in [proc, *proc.children(recursive=True)]:
                        for conn in below.net_connections(kind="tcp"):
                            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                                self.api_binds.add(conn.laddr.ip)
                except (psutil.Error, ValueError):
                    continue
            time.sleep(1.0)


def test_demo_help_comes_before_any_install():
    """``scripts/demo --help`` answers from Debian's python3, before the install it would otherwise wait for."""
    done = subprocess.run([str(REPO / "scripts" / "demo"), "--help"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, AIRFLOW_VERSION="0.0.0-not-installed"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: scripts/demo"), done.stdout
    assert "--no-fault" in done.stdout and "--keep" in done.stdout

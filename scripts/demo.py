"""The demo: the safe Airflow 3 family on Airflow's embedded SQLite default, a small DAG run to
success, then one fault side by side with stock, and a verdict. Run by ``scripts/demo``, which
installs first; ends by itself with exit 0 (``--keep`` leaves the family running until Ctrl-C).

1. ``airflow-safe-scheduler`` starts first: it sets up the SQLite database in ``AIRFLOW_HOME``.
2. ``airflow-safe-dag-processor``, ``airflow-safe-triggerer`` and ``airflow-safe-api-server``
   (tasks talk to it from Airflow 3 on; it listens on 127.0.0.1 only) join it.
3. The DAG ``safe_demo`` runs: a task, a deferred wait (the triggerer's), and a task whose cleanup
   is registered with ``on_termination``. Progress is read from the database.
4. The family stops on SIGTERM: exit codes, seconds, processes left.
5. ``kill -9`` of a stock ``airflow scheduler`` and of ``airflow-safe-scheduler`` (the PID a
   supervisor would have started), each with its children up: what each leaves running.

Every process it starts is stopped, and anything they left is killed, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

try:
    import psutil
except ImportError:  # ``scripts/demo --help`` before the install: Debian's python3, which only parses
    psutil = None

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYTHON = sys.executable

DAG = """
    from datetime import datetime

    from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
    from airflow.sdk import DAG, task

    from safe_scheduler.tasks import on_termination

    with DAG("safe_demo", schedule="@once", start_date=datetime(2026, 1, 1), catchup=False):

        @task
        def hello():
            print("hello from a task that airflow-safe-scheduler ran")

        @task
        def with_cleanup():
            with on_termination(timeout=10) as stop:
                stop.add(print, "if this task were stopped, its external job would be cancelled here")
                return "done"

        # Fifteen seconds after it starts: it defers to the triggerer at once, and resumes from it.
        # Not less: Airflow 3's worker may report the deferral up to [workers] min_heartbeat_interval
        # (5 s) late, and a trigger that fired before that report lands makes Airflow's scheduler
        # fail the resumed task ("reported ... success, but the task instance's state attribute is
        # queued"), which failed the demo once under load.
        wait = DateTimeSensorAsync(task_id="deferred_wait",
                                   target_time="{{ macros.datetime.utcnow() + macros.timedelta(seconds=15) }}")
        hello() >> wait >> with_cleanup()
"""


#: The ports the family binds, by the variable that sets each, with its default.
PORTS = (("AIRFLOW__SAFE_SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT", 8975),
         ("AIRFLOW__SAFE_SCHEDULER__TRIGGERER_HEALTH_CHECK_SERVER_PORT", 8976),
         ("AIRFLOW__SAFE_SCHEDULER__DAG_PROCESSOR_HEALTH_CHECK_SERVER_PORT", 8977),
         ("AIRFLOW__SAFE_SCHEDULER__API_SERVER_HEALTH_CHECK_SERVER_PORT", 8979),
         ("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", 8793),
         ("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT", 8794))


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


class Processes:
    """What the demo started, by pid, with everything they start: stopped and swept at the end."""

    def __init__(self, logs: Path, env: dict) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started[name] = proc
        self.record(proc.pid)
        return proc

    def record(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                self.seen.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def watch(self) -> None:
        for proc in list(self.started.values()):
            self.record(proc.pid)

    def left(self, pids: set[int] | None = None) -> list[psutil.Process]:
        return [p for pid, p in self.seen.items() if (pids is None or pid in pids) and _alive(p)]

    def stop(self, names: list[str], timeout: float) -> dict[str, tuple[int | None, float]]:
        """SIGTERM each, then wait: exit code and seconds for each (None: still running)."""
        self.watch()
        sent = time.monotonic()
        for name in names:
            if self.started[name].poll() is None:
                self.started[name].send_signal(signal.SIGTERM)
        result = {}
        for name in names:
            try:
                code = self.started[name].wait(max(0.1, sent + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            result[name] = (code, time.monotonic() - sent)
        return result

    def sweep(self) -> int:
        """Kill, by pid, whatever the demo started that is still alive; returns how many."""
        self.watch()
        killed = 0
        for proc in self.left():
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
        for proc in self.started.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return killed


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(condition, timeout: float, what: str, every: float = 10.0):
    """Poll ``condition`` until truthy; a progress line every ``every`` seconds; RuntimeError on timeout."""
    started = time.monotonic()
    next_line = started + every
    while True:
        value = condition()
        if value:
            return value
        now = time.monotonic()
        if now - started > timeout:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        if now >= next_line:
            say(f"  … still waiting for {what} ({now - started:.0f}s)")
            next_line += every
        time.sleep(0.5)


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def query(db: Path, sql: str) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def run_dag(db: Path, timeout: float) -> str:
    """Until ``safe_demo``'s run ends; each task's state as it changes. Returns the run's state."""
    shown: dict[str, str] = {}
    started = time.monotonic()
    next_line = started + 10

    def ended() -> str | None:
        nonlocal next_line
        for task_id, state in query(db, "SELECT task_id, state FROM task_instance WHERE dag_id = 'safe_demo'"):
            if state and shown.get(task_id) != state:
                why = {"deferred": "  (deferred: airflow-safe-triggerer runs its trigger)"}.get(state, "")
                if shown.get(task_id) == "deferred":
                    why = "  (resumed: its trigger fired in airflow-safe-triggerer)"
                shown[task_id] = state
                say(f"  {task_id}: {state}{why}")
        runs = query(db, "SELECT state FROM dag_run WHERE dag_id = 'safe_demo'")
        if runs and runs[0][0] in ("success", "failed"):
            return runs[0][0]
        if time.monotonic() >= next_line:
            say(f"  … the run is {runs[0][0] if runs else 'not created yet'} ({time.monotonic() - started:.0f}s)")
            next_line += 10
        return None

    return wait_for(ended, timeout, "the DAG run", every=3600)


def kill_nine(procs: Processes, name: str, cmd: list[str], children: int, timeout: float) -> dict:
    """Start ``cmd``, wait for ``children`` processes below it, ``kill -9`` it, count what is left."""
    say(f"  {name}: started; kill -9 once its children are up, then what is left is counted (up to 15 s)")
    proc = procs.start(name, cmd)
    wait_for(lambda: proc.poll() is None and len(psutil.Process(proc.pid).children(recursive=True)) >= children,
             timeout, f"{name}'s children")
    time.sleep(2)  # let the rest of its children start: what is left is counted from all it had
    procs.record(proc.pid)
    tree = {p.pid for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]}
    proc.kill()
    killed = time.monotonic()
    say(f"  {name}: kill -9 sent to pid {proc.pid} ({len(tree)} processes); counting what is left")
    proc.wait(10)
    deadline = killed + 15  # ours stops its children within its deadline; stock never does
    while procs.left(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = procs.left(tree)
    return {"of": len(tree), "left": len(left), "after": time.monotonic() - killed,
            "names": sorted({_name(p) for p in left})}


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(part for part in proc.cmdline()[:3] if part.strip())[:60] or proc.name()
    except psutil.Error:
        return "?"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--keep", action="store_true",
                        help="after the DAG run, keep the family running (UI URL and login printed) until Ctrl-C")
    parser.add_argument("--no-fault", action="store_true", help="skip the kill -9 comparison with stock")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    airflow_version = version("apache-airflow")  # not an import: that would read (or write) ~/airflow
    if not airflow_version.startswith("3."):
        print(f"scripts/demo: error: the demo runs the Airflow 3 family; this venv has {airflow_version} "
              "(AIRFLOW_VERSION=3.3.2 scripts/demo)", file=sys.stderr)
        return 2
    demo = Path(os.environ.get("DEMO_HOME", ROOT / ".demo")).resolve()
    home = demo / "airflow"
    if home.exists():
        import shutil

        shutil.rmtree(home)  # each run starts from nothing, as a new user does
    (home / "dags").mkdir(parents=True)
    (home / "logs").mkdir()
    (home / "dags" / "safe_demo.py").write_text(textwrap.dedent(DAG))
    api_port = free_port(8080)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        # What the family shares to run tasks at all from Airflow 3: the README says why.
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(16),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
        AIRFLOW__API__PORT=str(api_port), PYTHONUNBUFFERED="1",
        # The api-server answers a task from the embedded SQLite database, one writer at a time: on a
        # busy machine its first answers can take longer than the 5 s a task waits by default, and
        # the task then fails before it starts (seen once under the test suite's load).
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="30",
    )
    # Our endpoints' and the log servers' ports: as set in the environment, else the defaults, unless
    # something here already holds them.
    for variable, port in PORTS:
        env[variable] = os.environ.get(variable) or str(free_port(port))
    db = home / "airflow.db"
    procs = Processes(home / "logs", env)
    family = ["scheduler", "dag-processor", "triggerer", "api-server"]
    began = time.monotonic()
    try:
        say(f"Airflow {airflow_version} in {home} (logs: {home / 'logs'})")
        say("1/5 airflow-safe-scheduler: sets up the embedded SQLite database, then schedules")
        procs.start("scheduler", [str(BIN / "airflow-safe-scheduler")])
        endpoint = f"http://127.0.0.1:{env['AIRFLOW__SAFE_SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT']}/health"
        wait_for(lambda: _up(procs, "scheduler") and http_ok(endpoint), 300, "the scheduler's liveness endpoint")
        say(f"  healthy: {endpoint}")
        say("2/5 airflow-safe-dag-processor, airflow-safe-triggerer and airflow-safe-api-server")
        procs.start("dag-processor", [str(BIN / "airflow-safe-dag-processor")])
        procs.start("triggerer", [str(BIN / "airflow-safe-triggerer")])
        procs.start("api-server", [str(BIN / "airflow-safe-api-server"), "--host", "127.0.0.1", "--port", str(api_port)])
        wait_for(lambda: all(_up(procs, n) for n in family) and http_ok(f"http://127.0.0.1:{api_port}/api/v2/monitor/health"),
                 300, "the api-server")
        say("3/5 the DAG safe_demo: a task, a deferred wait (the triggerer's), a task with an on_termination cleanup")
        state = run_dag(db, 300)
        say(f"  the run: {state}")
        if state != "success":
            raise RuntimeError(f"the DAG run ended {state}; see {home / 'logs'}")
        if args.keep:
            _keep(home, api_port, procs, family)
        say("4/5 SIGTERM to the family")
        for name, (code, took) in procs.stop(family, 60).items():
            say(f"  {name}: {'still running' if code is None else f'exit {code}'} after {took:.1f}s")
        left = procs.left()
        say(f"  processes left: {len(left)}")
        procs.sweep()
        if not args.no_fault:
            _fault(procs)
        say(f"done in {time.monotonic() - began:.0f}s")
        return 0
    except KeyboardInterrupt:
        say("interrupted; stopping what the demo started")
        return 0
    except RuntimeError as exc:
        print(f"scripts/demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop([n for n in procs.started if procs.started[n].poll() is None], 40)
        procs.sweep()


def _up(procs: Processes, name: str) -> bool:
    proc = procs.started[name]
    if proc.poll() is not None:
        log = (procs.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"{name} exited with {proc.returncode}: {log[-1] if log else 'no output'}")
    return True


def _keep(home: Path, api_port: int, procs: Processes, family: list[str]) -> None:
    passwords = home / "simple_auth_manager_passwords.json.generated"
    login = ""
    if passwords.exists():
        login = ", ".join(f"{user} / {password}" for user, password in json.loads(passwords.read_text()).items())
    say(f"the family keeps running: UI at http://127.0.0.1:{api_port}/ (login: {login or 'see ' + str(passwords)}); "
        "Ctrl-C stops it")
    while all(procs.started[n].poll() is None for n in family):
        time.sleep(1)
    raise RuntimeError("a process of the family exited; see its log")


def _fault(procs: Processes) -> None:
    say("5/5 kill -9, as the OOM killer or a supervisor's last resort does: stock, then safe")
    stock = kill_nine(procs, "stock-scheduler", [PYTHON, "-m", "airflow", "scheduler"], 2, 180)
    procs.sweep()  # ours to clean up: the demo started them
    safe = kill_nine(procs, "safe-scheduler", [str(BIN / "airflow-safe-scheduler")], 3, 180)
    procs.sweep()
    say("verdict:")
    say(f"  stock airflow scheduler:  {stock['left']} of {stock['of']} processes still running "
        f"{stock['after']:.0f}s after kill -9" + (f" ({', '.join(stock['names'])})" if stock["names"] else ""))
    say(f"  airflow-safe-scheduler:   {safe['left']} of {safe['of']} processes left, "
        f"{'all gone' if not safe['left'] else 'still there'} {safe['after']:.1f}s after kill -9")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The command line: flag parity with the installed ``airflow scheduler``, and bad input refused
with one line and exit code 2, before anything starts."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from harness.cli import HIDDEN_FLAGS, OUR_FLAGS, flags_of, refused, run
from harness.deployment import PYTHON, SAFE, STOCK, Deployment, base_env
from safe_scheduler.base import compat

pytestmark = pytest.mark.all_versions


def test_flags_match_installed_airflow_scheduler(home):
    env = base_env(home)
    stock = run(STOCK + ["--help"], env)
    ours = run(SAFE + ["--help"], env)
    assert stock.returncode == 0 and ours.returncode == 0, stock.stderr + ours.stderr
    stock_flags, our_flags = flags_of(stock.stdout), flags_of(ours.stdout)
    for flag in ("--num-runs", "--skip-serve-logs", "--daemon", "--pid", "--stdout", "--stderr", "--log-file"):
        assert flag in stock_flags  # the parse itself is sound
    hidden = HIDDEN_FLAGS
    assert stock_flags - hidden <= our_flags, f"missing: {stock_flags - hidden - our_flags}"
    assert not hidden & our_flags
    assert our_flags - stock_flags == OUR_FLAGS


def _safe(name: str) -> list[str]:
    """The console script pip installed for ``airflow-safe-<name>``."""
    return [str(Path(PYTHON).parent / f"airflow-safe-{name}")]


@pytest.mark.parametrize("name", ["triggerer", "dag-processor"])
def test_component_flags_match_installed_airflow(home, name):
    env = base_env(home)
    stock = run([PYTHON, "-m", "airflow", name, "--help"], env)
    ours = run(_safe(name) + ["--help"], env)
    assert stock.returncode == 0 and ours.returncode == 0, stock.stderr + ours.stderr
    stock_flags, our_flags = flags_of(stock.stdout), flags_of(ours.stdout)
    assert "--daemon" in stock_flags  # the parse itself is sound
    hidden = HIDDEN_FLAGS  # where the command has it
    assert stock_flags - hidden <= our_flags, f"missing: {stock_flags - hidden - our_flags}"
    assert not hidden & our_flags
    # No executor, no tasks: the task flags are for the scheduler and the worker only.
    assert our_flags - stock_flags == OUR_FLAGS - {"--task-drain-timeout", "--task-cleanup-timeout",
                                                   "--orphaned-task-timeout"}


@pytest.mark.parametrize(
    ("name", "args", "expect"),
    [
        ("triggerer", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ("triggerer", ["--stall-timeout", "-1"], "--stall-timeout must be zero or more"),
        ("dag-processor", ["--shutdown-timeout", "never"], "--shutdown-timeout must be a number"),
        ("dag-processor", ["--num-runs", "oops"], "invalid int value"),
    ],
    ids=["triggerer-unknown-flag", "triggerer-bad-stall", "dag-processor-bad-timeout", "dag-processor-bad-num-runs"],
)
def test_component_bad_input_is_one_line_and_exit_2(home, name, args, expect):
    assert expect in refused(run(_safe(name) + args, base_env(home)), f"airflow-safe-{name}")


def test_triggerer_log_port_taken_is_refused(postgres, tmp_path):
    deployment = Deployment(tmp_path / "airflow", postgres.url)
    with socket.socket() as squatter:
        squatter.bind(("", deployment.trigger_log_port))
        squatter.listen()
        line = refused(run(_safe("triggerer"), deployment.env), "airflow-safe-triggerer")
    assert f"port {deployment.trigger_log_port}" in line and "trigger_log_server_port" in line


@pytest.mark.parametrize("name", ["scheduler", "triggerer", "dag-processor"])
def test_liveness_endpoint_port_taken_is_refused(postgres, tmp_path, name):
    deployment = Deployment(tmp_path / "airflow", postgres.url)
    port = deployment.endpoint_port(name)
    if name == "dag-processor" and compat.airflow_has_key("scheduler", "standalone_dag_processor"):
        deployment.env["AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR"] = "True"
    with socket.socket() as squatter:
        squatter.bind(("", port))
        squatter.listen()
        line = refused(run(_safe(name), deployment.env), f"airflow-safe-{name}")
    key = f"{name.replace('-', '_')}_health_check_server_port"
    assert f"port {port}" in line and key in line and "already in use" in line


@pytest.mark.parametrize("value, expect", [
    ("http", "must be a port number"), ("0", "from 1 to 65535"), ("70000", "from 1 to 65535"),
])
def test_bad_liveness_endpoint_port_is_refused(home, value, expect):
    env = dict(base_env(home), AIRFLOW__SAFE_SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=value)
    line = refused(run(SAFE, env))
    assert "scheduler_health_check_server_port" in line and expect in line


def test_dag_processor_refuses_what_stock_refuses(postgres, tmp_path):
    """2.x: not standalone -> refused as stock refuses it; 3.x: an unknown bundle."""
    deployment = Deployment(tmp_path / "airflow", postgres.url)
    if compat.AIRFLOW_3:
        line = refused(run(_safe("dag-processor") + ["--bundle-name", "nope"], deployment.env), "airflow-safe-dag-processor")
        assert "nope" in line
    else:
        line = refused(run(_safe("dag-processor"), deployment.env), "airflow-safe-dag-processor")
        assert "standalone_dag_processor" in line


@pytest.mark.parametrize(
    ("args", "env", "expect"),
    [
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
        (["--shutdown-timeout", "-5"], {}, "--shutdown-timeout must be more than zero"),
        (["--shutdown-timeout", "soon"], {}, "--shutdown-timeout must be a number"),
        (["--child-stop-timeout", "nan"], {}, "--child-stop-timeout must be a finite number"),
        (["--child-stop-timeout", "-1"], {}, "--child-stop-timeout must be zero or more"),
        (["--shutdown-timeout", "4", "--child-stop-timeout", "9"], {}, "must not exceed shutdown_timeout"),
        ([], {"AIRFLOW__SAFE_SCHEDULER__SHUTDOWN_TIMEOUT": "thirty"}, "[safe_scheduler] shutdown_timeout"),
        ([], {"AIRFLOW__SAFE_SCHEDULER__CHILD_STOP_TIMEOUT": "-2"}, "[safe_scheduler] child_stop_timeout"),
        (["--task-cleanup-timeout", "29"], {}, "must not exceed what shutdown_timeout (30s) leaves the tasks: 22s"),
        ([], {"AIRFLOW__SAFE_SCHEDULER__TASK_DRAIN_TIMEOUT": "-1"}, "[safe_scheduler] task_drain_timeout"),
        (["--num-runs", "oops"], {}, "invalid int value"),
        ([], {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": ""}, "no metadata database configured"),
        # Not answering is waited for (tests/test_dbwait.py), unless the wait is turned off.
        (["--db-wait-timeout", "0"],
         {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow@127.0.0.1:9/airflow"},
         "cannot connect to the metadata database"),
        (["--db-wait-timeout", "-5"], {}, "--db-wait-timeout must be zero or more"),
    ],
    ids=[
        "unknown-flag", "negative-timeout", "non-numeric-timeout", "nan-timeout", "negative-child-timeout",
        "child-above-shutdown", "bad-env-shutdown", "bad-env-child", "tasks-above-shutdown",
        "bad-env-drain", "bad-num-runs",
        "no-db", "db-unreachable-no-wait", "negative-db-wait",
    ],
)
def test_bad_input_is_one_line_and_exit_2(home, args, env, expect):
    line = refused(run(SAFE + args, dict(base_env(home), **env)))
    assert expect in line


def test_unforeseen_error_while_preparing_is_still_one_line(postgres, tmp_path):
    """A log-server port that is not a number fails deep inside our preparation, in a way no check
    of ours foresaw: still one line naming the error, exit 2, nothing started."""
    deployment = Deployment(tmp_path / "airflow", postgres.url)
    env = dict(deployment.env, AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT="eighty")
    line = refused(run(SAFE, env))
    assert "could not prepare the scheduler: ValueError" in line and "eighty" in line


def test_only_idle_alone_is_refused(home):
    line = refused(run(SAFE + ["--only-idle"], base_env(home)))
    if any("--only-idle" in arg.flags for arg in compat.cli_command("scheduler").args):
        assert "--only-idle requires --num-runs" in line
    else:  # releases before 3.2 have no such flag, and neither do we there
        assert "unrecognized arguments: --only-idle" in line


def test_port_taken_is_refused(postgres, tmp_path):
    deployment = Deployment(tmp_path / "airflow", postgres.url)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", deployment.health_port))
        squatter.listen()
        line = refused(run(SAFE, deployment.env))
    assert f"port {deployment.health_port}" in line and "already in use" in line


def test_uninitialised_database_is_refused(postgres, tmp_path):
    postgres.execute("CREATE DATABASE empty")
    url = postgres.url.rsplit("/", 1)[0] + "/empty"
    deployment = Deployment(tmp_path / "airflow", url)
    line = refused(run(SAFE, deployment.env))
    assert "not initialised" in line and "airflow db migrate" in line


def test_embedded_sqlite_is_set_up_and_num_runs_ends_cleanly(home):
    """The README's first command: no database configured anywhere, Airflow's SQLite default."""
    result = run(SAFE + ["--num-runs", "1", "--skip-serve-logs"], base_env(home), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = run(
        [sys.executable, "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("
         "\"select count(*) from job where job_type='SchedulerJob' and end_date is not null\").fetchone()[0])",
         str(home / "airflow.db")],
        base_env(home),
    )
    assert check.stdout.strip() == "1", check.stderr


def test_version(home):
    result = run(SAFE + ["--version"], base_env(home))
    assert result.returncode == 0
    assert re.match(r"airflow-safe-scheduler \S+ \(Apache Airflow \d+\.\d+\.\d+", result.stdout)


@pytest.mark.parametrize("which", ["missing", "empty"])
def test_a_sqlite_path_other_than_the_default_is_never_created_or_migrated(home, which):
    """A typo in a SQLite path must not start a new, empty metadata database; an empty file that is
    not the embedded default is not migrated either."""
    target = home / "typo" / "airlfow.db" if which == "missing" else home / "other.db"
    if which == "empty":
        target.touch()
    env = dict(base_env(home), AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{target}")
    line = refused(run(SAFE + ["--num-runs", "1"], env))
    assert ("does not exist" if which == "missing" else "run 'airflow db migrate' first") in line
    assert not target.exists() if which == "missing" else target.stat().st_size == 0

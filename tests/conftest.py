"""Fixtures: one migrated PostgreSQL template per test run, then per test its own server, ports,
AIRFLOW_HOME and scheduler processes, all cleaned up by pid.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import pg  # noqa: E402
from harness.deployment import PYTHON, Deployment, base_env  # noqa: E402
from harness.listener import Listener  # noqa: E402

ROOT_ENV = "SAFE_SCHEDULER_TEST_ROOT"


def pytest_configure(config: pytest.Config) -> None:
    # The controller makes one world-traversable directory (the server runs as ``postgres`` and
    # pytest's own tmp dirs are private to root); xdist workers inherit it through the environment.
    if ROOT_ENV not in os.environ:
        root = tempfile.mkdtemp(prefix="safe-scheduler-tests-", dir="/tmp")
        os.chmod(root, 0o755)
        os.environ[ROOT_ENV] = root
        config._safe_scheduler_root = root  # type: ignore[attr-defined]
        # Tests import Airflow (through safe_scheduler.compat) in this process too: keep the
        # airflow.cfg that Airflow writes on first import out of the user's ~/airflow.
        os.environ["AIRFLOW_HOME"] = os.path.join(root, "pytest-airflow-home")


def pytest_unconfigure(config: pytest.Config) -> None:
    root = getattr(config, "_safe_scheduler_root", None)
    if root:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def test_root() -> Path:
    return Path(os.environ[ROOT_ENV])


@pytest.fixture(scope="session")
def pg_template(test_root: Path) -> Path:
    """A migrated data directory, built once per run by whichever worker gets here first."""
    with open(test_root / "template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = test_root / "template.ready"
        if not ready.exists():
            home = test_root / "template-home"
            home.mkdir()
            pg.make_template(test_root, base_env(home), PYTHON)
            ready.touch()
    return test_root / "template"


@pytest.fixture
def postgres(pg_template: Path, test_root: Path):
    workdir = Path(tempfile.mkdtemp(prefix="pg-", dir=test_root))
    workdir.chmod(0o755)
    server = pg.clone(pg_template, workdir / "data")
    server.start()
    yield server
    server.destroy()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def deployment(postgres, tmp_path: Path):
    dep = Deployment(tmp_path / "airflow", postgres.url)
    yield dep
    dep.cleanup()


@pytest.fixture
def celery_deployment(postgres, tmp_path: Path):
    """A deployment on CeleryExecutor: its own Redis broker (Debian's redis-server, a free port)
    and, once ``start_worker`` is called, a real ``airflow celery worker``."""
    from harness.broker import RedisServer

    redis = RedisServer(tmp_path / "redis").start()
    dep = Deployment(tmp_path / "airflow", postgres.url)
    dep.use_celery(redis)
    yield dep
    dep.cleanup()
    redis.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "airflow"
    path.mkdir()
    return path


@pytest.fixture
def statsd():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    listener = Listener(sock)
    listener.env = {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(sock.getsockname()[1]),
    }
    yield listener
    listener.close()

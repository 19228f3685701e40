"""Fixtures: one migrated PostgreSQL template per test run, then per test its own server, ports,
AIRFLOW_HOME and scheduler processes, all cleaned up by pid.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pg  # noqa: E402
from procs import SchedulerProcess, http_status, wait_for  # noqa: E402

from safe_scheduler.settings import HEALTH_PORTS, health_port_key  # noqa: E402

ROOT_ENV = "SAFE_SCHEDULER_TEST_ROOT"
PYTHON = sys.executable
SAFE = [PYTHON, "-m", "safe_scheduler"]
STOCK = [PYTHON, "-m", "airflow", "scheduler"]


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


def base_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(home / "plugins"),
        AIRFLOW__API_AUTH__JWT_SECRET="safe-scheduler-tests",
        PYTHONUNBUFFERED="1",
    )
    # Our liveness endpoints' own free ports: tests run side by side, each with its own ports.
    for name in HEALTH_PORTS:
        env[health_port_variable(name)] = str(pg.free_port())
    return env


def health_port_variable(name: str) -> str:
    """The environment variable that sets ``airflow-safe-<name>``'s liveness endpoint port."""
    return f"AIRFLOW__SAFE_SCHEDULER__{health_port_key(name).upper()}"


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


def _reaped(stock: bool, args) -> bool:
    """Whether our tiny parent runs above the job process (not for stock, not for ``-D``)."""
    return not stock and not {"-D", "--daemon"} & set(args)


class Deployment:
    """One AIRFLOW_HOME with its own ports and database, and the schedulers started in it."""

    def __init__(self, home: Path, db_url: str) -> None:
        self.home = home
        for sub in ("dags", "plugins", "config"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        self.health_port = pg.free_port()
        self.log_port = pg.free_port()
        self.trigger_log_port = pg.free_port()
        self.env = base_env(home)
        self.env.update(
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=db_url,
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="4",
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(self.log_port),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(self.trigger_log_port),
            # Only keys every supported release has: the health server's host is not one (2.6 binds
            # 0.0.0.0 and has no setting), and a test that sets it would hide a crash on 2.6.
            AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="True",
            AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=str(self.health_port),
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
        )
        self.started: list[SchedulerProcess] = []

    def endpoint_port(self, name: str) -> int:
        """Where ``airflow-safe-<name>`` started here answers its liveness probe."""
        return int(self.env[health_port_variable(name)])

    def add_plugin(self, name: str, source: str) -> None:
        (self.home / "plugins" / f"{name}.py").write_text(textwrap.dedent(source))

    def add_local_settings(self, source: str) -> None:
        (self.home / "config" / "airflow_local_settings.py").write_text(textwrap.dedent(source))

    def scheduler(self, *args: str, stock: bool = False, output: int | None = None, **env: str) -> SchedulerProcess:
        """Start a scheduler; its stdout and stderr go to a log file, or to ``output`` (a pipe's fd)."""
        cmd = (STOCK if stock else SAFE) + list(args)
        log = self.home / f"scheduler-{len(self.started)}.log"
        proc = SchedulerProcess(cmd, dict(self.env, **env), log, self.health_port, reaped=_reaped(stock, args))
        self.started.append(proc)
        return proc.start(output)

    def component(self, name: str, *args: str, stock: bool = False, **env: str) -> SchedulerProcess:
        """Start ``airflow-safe-<name>`` (its console script), or stock ``airflow <name>``."""
        cmd = [PYTHON, "-m", "airflow", name] if stock else [str(Path(PYTHON).parent / f"airflow-safe-{name}")]
        log = self.home / f"{name}-{len(self.started)}.log"
        proc = SchedulerProcess(cmd + list(args), dict(self.env, **env), log, 0, reaped=_reaped(stock, args))
        self.started.append(proc)
        return proc.start()

    def airflow(self, *args: str) -> SchedulerProcess:
        """Start another Airflow command here (``dag-processor``, ``api-server``), logged to
        ``<command>.log`` and killed by pid, with everything it forked, when the deployment is."""
        helper = SchedulerProcess([PYTHON, "-m", "airflow", *args], self.env, self.home / f"{args[0]}.log", 0)
        self.started.append(helper)
        return helper.start()

    def start_task_services(self) -> None:
        """What running tasks needs besides the scheduler: from Airflow 3, api-server and dag-processor."""
        from safe_scheduler import compat

        if not compat.tasks_need_api_server_and_dag_processor():
            return
        api_port = pg.free_port()
        api = f"http://127.0.0.1:{api_port}/execution/"
        # A loaded CI machine answers the first requests slowly; the default 5 s fails the task.
        self.env.update(AIRFLOW__CORE__EXECUTION_API_SERVER_URL=api, AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60")
        self.airflow("api-server", "--port", str(api_port))
        self.airflow("dag-processor")
        wait_for(lambda: http_status(api + "health") == 200, 180, interval=0.5, message="the api-server")

    def use_celery(self, redis) -> None:
        """CeleryExecutor on ``redis`` (a ``broker.RedisServer``): only what it needs to find its
        broker; results go to the metadata DB by default."""
        self.redis = redis
        self.env.update(AIRFLOW__CORE__EXECUTOR="CeleryExecutor", AIRFLOW__CELERY__BROKER_URL=redis.url)

    def start_worker(self, concurrency: int = 4) -> SchedulerProcess:
        """A real Celery worker for this deployment (from Airflow 3 it runs tasks through the
        execution API: ``start_task_services`` first)."""
        return self.airflow("celery", "worker", "--concurrency", str(concurrency))

    def cleanup(self) -> None:
        for proc in self.started:
            proc.cleanup()


@pytest.fixture
def deployment(postgres, tmp_path: Path):
    dep = Deployment(tmp_path / "airflow", postgres.url)
    yield dep
    dep.cleanup()


@pytest.fixture
def celery_deployment(postgres, tmp_path: Path):
    """A deployment on CeleryExecutor: its own Redis broker (Debian's redis-server, a free port)
    and, once ``start_worker`` is called, a real ``airflow celery worker``."""
    from broker import RedisServer

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

"""One Airflow deployment for a test or a bench run: its own AIRFLOW_HOME, ports and database, the
commands started in it (safe or stock), and the services tasks need; every process killed by pid."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from harness import pg
from harness.procs import SchedulerProcess, http_status, wait_for
from safe_scheduler import components
from safe_scheduler.startup.settings import health_port_key

PYTHON = sys.executable
SAFE = [PYTHON, "-m", "safe_scheduler"]
STOCK = [PYTHON, "-m", "airflow", "scheduler"]


def health_ports() -> dict[str, int]:
    """Our liveness endpoint's default port per component, as the chart's probes expect them (read
    when asked: the components import Airflow, which must not happen before the tests set
    AIRFLOW_HOME)."""
    return {name: components.get(name).health_port for name in components.names()}


def tasks_need_api_server_and_dag_processor() -> bool:
    """Whether tasks run only with an ``airflow api-server`` and a separate ``airflow dag-processor``.

    From Airflow 3 a task talks to the execution API instead of the database, and the scheduler no
    longer parses DAG files itself; before, ``airflow scheduler`` alone runs tasks.
    """
    import importlib.util

    try:
        return importlib.util.find_spec("airflow.api_fastapi.execution_api") is not None
    except ModuleNotFoundError:  # no airflow.api_fastapi at all
        return False


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
    for name in components.names():
        env[health_port_variable(name)] = str(pg.free_port())
    return env


def health_port_variable(name: str) -> str:
    """The environment variable that sets ``airflow-safe-<name>``'s liveness endpoint port."""
    return f"AIRFLOW__SAFE_SCHEDULER__{health_port_key(name).upper()}"


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

    def scheduler(self, *args: str, stock: bool = False, output: int | None = None, own_session: bool = False,
                  **env: str) -> SchedulerProcess:
        """Start a scheduler; its stdout and stderr go to a log file, or to ``output`` (a pipe's fd)."""
        cmd = (STOCK if stock else SAFE) + list(args)
        log = self.home / f"scheduler-{len(self.started)}.log"
        proc = SchedulerProcess(cmd, dict(self.env, **env), log, self.health_port, reaped=_reaped(stock, args),
                                own_session=own_session)
        self.started.append(proc)
        return proc.start(output)

    def component(self, name: str, *args: str, stock: bool = False, own_session: bool = False,
                  **env: str) -> SchedulerProcess:
        """Start ``airflow-safe-<name>`` (its console script), or stock ``airflow <name>``."""
        cmd = [PYTHON, "-m", "airflow", name] if stock else [str(Path(PYTHON).parent / f"airflow-safe-{name}")]
        log = self.home / f"{name}-{len(self.started)}.log"
        proc = SchedulerProcess(cmd + list(args), dict(self.env, **env), log, 0, reaped=_reaped(stock, args),
                                own_session=own_session)
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
        if not tasks_need_api_server_and_dag_processor():
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

    def worker(self, *args: str, stock: bool = False, concurrency: int = 4, own_session: bool = False,
               **env: str) -> SchedulerProcess:
        """``airflow-safe-celery-worker`` (its console script) or stock ``airflow celery worker``,
        logged to ``worker-<n>.log``; ``env`` on top of the deployment's (another broker URL)."""
        cmd = ([PYTHON, "-m", "airflow", "celery", "worker"] if stock
               else [str(Path(PYTHON).parent / "airflow-safe-celery-worker")])
        log = self.home / f"worker-{len(self.started)}.log"
        proc = SchedulerProcess(cmd + ["--concurrency", str(concurrency), *args], dict(self.env, **env), log,
                                self.endpoint_port("celery-worker"), reaped=_reaped(stock, args),
                                own_session=own_session)
        self.started.append(proc)
        return proc.start()

    def cleanup(self) -> None:
        for proc in self.started:
            proc.cleanup()

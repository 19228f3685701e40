"""``airflow api-server`` (Airflow 3): the server every task fetches its context from, heartbeats
through and reports its end to.

It is no Airflow job: no job row, no heartbeat. Its sign of life is each worker's own event loop
turning (``api_server_beats``): every worker (uvicorn's spawned workers, gunicorn's forked ones,
or the job process itself with one worker) beats through the server's own notify hook (uvicorn's
``callback_notify``, which gunicorn's worker uses for its heartbeat too). One blocked worker is a
stalled server, although uvicorn's supervisor would keep it (its worker answers pings
from a thread, so a blocked loop still looks alive to it). Gunicorn restarts a worker whose loop
is blocked after ``[api] worker_timeout`` (120 s); our ``stall_timeout`` (60 s) acts first, on the
whole server, because a loop blocked by a route blocks again on the next call of that route.

A stall kills the blocked workers at once (they can serve nothing, and their SIGTERM handler never
runs while the loop is blocked); the others get the usual stop. With one worker the blocked loop is
the job's own main thread: the process is forced out at once (exit 4). A database that is down is not the
server's fault: the endpoint says so in its body and keeps answering 200.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from safe_scheduler.base import compat, exitcodes, threads
from safe_scheduler.base.errors import UsageError
from safe_scheduler.base.exitcodes import Cause
from safe_scheduler.base.ports import check_port_free
from safe_scheduler.components.api_server_beats import BEAT_EVERY, BEATS_ENV, Beats, beat
from safe_scheduler.components.base import Capability, Component, Job, Run
from safe_scheduler.shutdown import watchdog

log = logging.getLogger("safe_scheduler.api_server")

#: Seconds a worker has to exit once its requests' grace is over (its own server stop and its
#: interpreter's end).
WORKER_EXIT = 2.0
#: Seconds between two looks at the metadata database, for the endpoint's body only.
DB_LOOK = 1.0


class DatabaseWatch:
    """The metadata database's last answer, for the endpoint's body: the server is not to blame for it."""

    def __init__(self) -> None:
        self.answered = time.monotonic()

    def start(self) -> None:
        threads.start_daemon("safe-db-look", self._look)

    def note(self) -> dict[str, Any]:
        silent = time.monotonic() - self.answered
        if silent < 2 * DB_LOOK + 1:
            return {"metadata_database": "answering"}
        return {"metadata_database": f"no answer for {silent:.0f}s: not this server's fault, a restart would not "
                                     "bring it back"}

    def _look(self) -> None:
        from airflow import settings as airflow_settings
        from sqlalchemy import text

        while True:
            try:
                with airflow_settings.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                self.answered = time.monotonic()
            except Exception:  # noqa: BLE001 - the note says it; the server goes on
                pass
            time.sleep(DB_LOOK)


class ApiServer:
    """The server as ``airflow api-server`` runs it (uvicorn or gunicorn), with every worker's loop beating."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.beats = Beats()
        self.database = DatabaseWatch()
        #: Seconds in-flight requests get at a stop: what the time plan leaves them (``Workers.attach``).
        self.grace: float = float(args.worker_timeout)

    def run(self) -> None:
        """Stock's ``api_server`` from its banner on: the apps, the signing key, the server."""
        from airflow.api_fastapi.auth.tokens import get_signing_args
        from airflow.cli.commands import api_server_command as stock

        os.environ["AIRFLOW_API_APPS"] = self.args.apps
        os.environ[BEATS_ENV] = str(self.beats.port)
        get_signing_args()  # as stock: set now, so that every worker gets the same key
        with self._beating():
            stock._run_api_server(args=self.args, apps=self.args.apps, num_workers=self.args.workers,
                                  worker_timeout=self.args.worker_timeout, proxy_headers=self.args.proxy_headers)

    @contextlib.contextmanager
    def _beating(self) -> Iterator[None]:
        """uvicorn's config gets our notify hook and the stop's grace (``uvicorn.run`` takes neither
        hook nor config; the config is built inside it, and a spawned worker gets it pickled);
        gunicorn's uvicorn worker beats with its own heartbeat, and its arbiter gets the same grace."""
        main = importlib.import_module("uvicorn.main")  # ``uvicorn.main`` the attribute is its click command
        grace = self.grace
        config = main.Config

        def beating_config(*args: Any, **kwargs: Any) -> Any:
            kwargs.update(callback_notify=beat, timeout_notify=BEAT_EVERY,
                          timeout_graceful_shutdown=min(kwargs.get("timeout_graceful_shutdown") or grace, grace))
            return config(*args, **kwargs)

        main.Config = beating_config
        undo = [lambda: setattr(main, "Config", config)]
        worker = importlib.import_module("uvicorn.supervisors.multiprocess").Process
        join = worker.join

        def bounded_join(process: Any) -> None:
            """uvicorn waits for a stopped worker forever; a thread the worker's logging started (a log
            shipper's) would hold it forever. Its requests had their grace: past it, it is killed."""
            process.process.join(grace + WORKER_EXIT)
            if process.process.is_alive():
                log.warning("api-server worker %s did not exit %gs after SIGTERM (a non-daemon thread?): killing it",
                            process.pid, grace + WORKER_EXIT)
                process.process.kill()
            join(process)

        worker.join = bounded_join
        undo.append(lambda: setattr(worker, "join", join))
        with contextlib.suppress(ImportError):  # gunicorn is an extra (apache-airflow-core[gunicorn])
            from airflow.api_fastapi import gunicorn_app
            from uvicorn.workers import UvicornWorker

            notify, create = UvicornWorker.callback_notify, gunicorn_app.create_gunicorn_app

            async def beating_notify(worker: Any) -> None:
                await notify(worker)
                await beat()

            def graced_app(*args: Any, **kwargs: Any) -> Any:
                app = create(*args, **kwargs)
                app.cfg.set("graceful_timeout", min(app.cfg.graceful_timeout, grace))
                return app

            UvicornWorker.callback_notify, gunicorn_app.create_gunicorn_app = beating_notify, graced_app
            undo.append(lambda: setattr(UvicornWorker, "callback_notify", notify))
            undo.append(lambda: setattr(gunicorn_app, "create_gunicorn_app", create))
        try:
            yield
        finally:
            for step in undo:
                step()


class Workers(Capability):
    """The beats and the database look start with the run; a stall kills the workers that stopped
    beating, whose loops cannot run their own SIGTERM handler."""

    def attach(self, server: ApiServer, run: Run) -> None:
        server.grace = min(server.grace, run.shutdown.plan.for_tasks)
        server.beats.start()
        server.database.start()
        run.notes.append(server.database.note)

        def kill_the_blocked(reason: str) -> None:
            if run.shutdown.cause is not Cause.STALLED:
                return
            blocked = server.beats.stale(2 * BEAT_EVERY)
            if os.getpid() in blocked:
                # One worker ([api] workers' default): the blocked loop is this process's main
                # thread, which nothing can unwind; the deadline would only wait for it.
                watchdog.force_exit(exitcodes.STALLED, f"{reason}; the blocked loop is the server's own", "stall",
                                    run.metrics)
            for pid in blocked:
                log.error("Killing api-server worker %d: its event loop has not turned (%s)", pid, reason)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

        run.shutdown.on_begin.append(kill_the_blocked)


def check(args: argparse.Namespace) -> None:
    """What stock refuses from its flags (TLS files), what it cannot do under us (``--dev``'s
    reloader), and its port taken (stock's "address already in use", as one line)."""
    from airflow.configuration import conf
    from airflow.cli.commands import api_server_command as stock

    if getattr(args, "dev", False):
        raise UsageError("--dev runs a reloading development server; run `airflow api-server --dev` for that")
    try:
        stock._get_ssl_filepaths(args)
        stock._ssl_cert_reqs(args)
    except Exception as exc:  # noqa: BLE001 - stock's AirflowConfigException / ValueError, as one line
        raise UsageError(str(exc)) from None
    if conf.get("api", "server_type", fallback="uvicorn").lower() == "gunicorn":
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            raise UsageError("[api] server_type is gunicorn, which is not installed: "
                             "pip install 'apache-airflow-core[gunicorn]'") from None
    check_port_free(args.host, args.port, "--port, the api-server's")


class ApiServerJob(Job):
    """The server's run is stock's; its progress, its workers' loops turning."""

    progress = "turn of each worker's event loop"

    def __init__(self) -> None:
        # No heartbeat of Airflow's to derive the stall timeout from: half of gunicorn's worker
        # timeout (120 s), so that ours acts on a blocked loop first.
        super().__init__(ApiServer, None, stall_timeout=60.0)

    def airflow_command(self, name: str) -> Any:
        try:
            return compat.cli_command(name)
        except RuntimeError:
            raise UsageError(f"the api-server came with Airflow 3; this is Airflow {compat.AIRFLOW_VERSION}: "
                             "run `airflow webserver`") from None

    def defaults(self) -> dict[str, float]:
        # The chart gives the api-server's pod Kubernetes' default 30 s from SIGTERM to SIGKILL:
        # 15 are the deadline, and the backstops behind it (8 s) and our parent's sweep (5 s) fit.
        return {"shutdown_timeout": 15.0}

    def run(self, server: ApiServer) -> Any:
        return server.run()

    def on_progress(self, server: ApiServer, callback: Callable[[], None]) -> None:
        server.beats.on_turn.append(callback)

    def daemon_name(self, name: str) -> str:
        return "api_server"  # stock's pid and log files: airflow-api_server.pid, .out, .err, .log


COMPONENT = Component(
    name="api-server",
    health_port=8979,
    job=ApiServerJob(),
    check=check,
    capabilities=(Workers(),),
)

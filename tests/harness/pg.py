"""A real PostgreSQL server for tests: initdb/pg_ctl as the ``postgres`` user, a free port, a temp dir.

Fault tests stop or freeze *their* server, so every test gets its own server, started from a copy
of one data directory that was initialised and migrated once per test run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from harness.procs import port_free

PG_USER = "postgres"
DB_NAME = "airflow"
DB_ROLE = "airflow"


def bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found: install Debian's 'postgresql' (see .ci/run)")


_PORTS_BELOW_EPHEMERAL = range(20000, 32000)
_handed_out: set = set()


def free_port() -> int:
    """A port no one holds, below the kernel's ephemeral range (32768 up).

    A port the kernel picked for ``bind(0)`` is an ephemeral port: between our pick and the server's
    bind, any outgoing connection (a PostgreSQL client, Redis) may take it as its source port, which
    failed CI twice with "address already in use". Each xdist worker draws from its own slice, and
    never hands out a port twice."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    slot = int(worker) % workers if worker.isdigit() else 0
    size = len(_PORTS_BELOW_EPHEMERAL) // workers
    start = _PORTS_BELOW_EPHEMERAL.start + slot * size
    offset = (os.getpid() * 7) % size
    for _ in range(2):
        for step in range(size):
            port = start + (offset + step) % size
            if port in _handed_out or not port_free(port):
                continue
            _handed_out.add(port)
            return port
        _handed_out.clear()  # every port of the slice handed out once: the oldest are long free
    raise RuntimeError(f"no free port in {start}..{start + size}")


def _as_pg_user() -> dict:
    """The server refuses to run as root: drop to ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return {}
    if sys.version_info >= (3, 9):
        return {"user": PG_USER, "group": PG_USER, "extra_groups": []}
    import pwd  # Python 3.7/3.8 (Airflow 2.6.3's oldest): no user= in subprocess yet

    entry = pwd.getpwnam(PG_USER)

    def drop() -> None:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return {"preexec_fn": drop}


def chown_to_pg_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, PG_USER, PG_USER)


class PgServer:
    def __init__(self, datadir: Path, port: int | None = None) -> None:
        self.datadir = datadir
        self.port = port or free_port()
        self.logfile = datadir.parent / f"{datadir.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{DB_ROLE}@127.0.0.1:{self.port}/{DB_NAME}"

    def _pg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(bindir() / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **_as_pg_user(),
        )
        if done.returncode != 0:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr}{done.stdout}\n{log}")
        return done

    def initdb(self) -> None:
        self.datadir.mkdir(mode=0o700)
        chown_to_pg_user(self.datadir)
        self._pg("initdb", "-D", str(self.datadir), "-U", DB_ROLE, "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        if not self.logfile.exists():
            self.logfile.touch()
            chown_to_pg_user(self.logfile)
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += " -c synchronous_commit=off -c full_page_writes=off"
        self._pg("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def postmaster(self) -> psutil.Process | None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            return psutil.Process(pid)
        except (FileNotFoundError, ValueError, IndexError, psutil.NoSuchProcess):
            return None

    def processes(self) -> list[psutil.Process]:
        master = self.postmaster()
        if master is None:
            return []
        try:
            return [master, *master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def freeze(self) -> None:
        """SIGSTOP every server process: a DB that accepts connections and never answers."""
        for proc in self.processes():  # the postmaster first: it forks no new backend after that
            with contextlib.suppress(psutil.NoSuchProcess):  # a backend that was just exiting
                proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)

    def execute(self, sql: str) -> list[tuple]:
        import psycopg2

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg2.connect(
                    host="127.0.0.1", port=self.port, user=DB_ROLE, dbname=DB_NAME, connect_timeout=5
                )
                try:
                    conn.autocommit = True  # CREATE DATABASE refuses to run in a transaction
                    with conn.cursor() as cur:
                        cur.execute(sql)
                        return cur.fetchall() if cur.description else []
                finally:
                    conn.close()
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def destroy(self) -> None:
        """Stop the server whatever its state (frozen, running, stopped) and remove its files."""
        if self.postmaster() is not None:
            self.thaw()
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                for proc in self.processes():
                    proc.kill()
        shutil.rmtree(self.datadir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):  # no missing_ok before Python 3.8
            self.logfile.unlink()


def make_template(root: Path, migrate_env: dict, python: str) -> Path:
    """Initialise a cluster, create the Airflow database, migrate it with Airflow, stop it."""
    server = PgServer(root / "template")
    server.initdb()
    server.start()
    try:
        subprocess.run(
            [str(bindir() / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", DB_ROLE, DB_NAME],
            check=True, capture_output=True, timeout=60, **_as_pg_user(),
        )
        from safe_scheduler.base import compat

        env = dict(migrate_env, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=server.url)
        done = subprocess.run(
            [python, *compat.migrate_db_command()[1:]],
            env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"migrating the template database failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    finally:
        server.stop("fast")
    return server.datadir


def clone(template: Path, datadir: Path) -> PgServer:
    """A new server on a free port whose data directory is a copy of ``template``."""
    subprocess.run(["cp", "-a", str(template), str(datadir)], check=True, timeout=120)
    return PgServer(datadir)

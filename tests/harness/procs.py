"""Start a scheduler as a real process and watch every process it ever forks.

The watcher records the scheduler's descendants while they are alive, so that after the scheduler
is gone we can still tell whether any of them survived it (an orphan is re-parented and no longer
findable from the scheduler). Cleanup kills only those recorded pids, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is dead; only its exit status is left)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def threads_of(pid: int) -> dict[int, tuple[str, float]]:
    """Kernel name and CPU seconds (user + system) of each thread of ``pid``, read from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = (task / "stat").read_text()
            # The name is in parentheses and may hold spaces: the fields after it are fixed.
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            found[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def wait_for(condition, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll ``condition`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def fill_pipe(write_end: int, wake: bool = False) -> int:
    """Fill a pipe to the brim through a second, non-blocking open of it; return the bytes written.

    The descriptor the process under test holds stays blocking, as it would be in real life.
    ``wake``: first write one byte and pause, so that a reader blocked in ``read()`` returns.
    """
    extra = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
    filled = 0
    try:
        if wake:
            filled += os.write(extra, b"\n")
            time.sleep(0.5)
        while True:
            filled += os.write(extra, b"\n" * 65536)
    except BlockingIOError:
        return filled
    finally:
        os.close(extra)


def stop(popen: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: how the tests stop a helper they started."""
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(10)


def port_free(port: int) -> bool:
    """Whether a server could bind ``port`` on every address now (as ours do, SO_REUSEADDR)."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def http_status(url: str) -> int | None:
    """HTTP status of a GET of ``url``; None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def health_status(port: int) -> int | None:
    """HTTP status of the scheduler health check on ``port``; None if nothing answers."""
    return http_status(f"http://127.0.0.1:{port}/health")


class TreeWatcher:
    """Records every descendant of ``pid`` while it lives, so survivors can be found afterwards."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _record(self) -> list[psutil.Process]:
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.setdefault((child.pid, child.create_time()), child)
        return children

    def _watch(self) -> None:
        while not self._stop.is_set() and alive(self.root):
            self._record()
            time.sleep(0.05)

    def freeze(self) -> None:
        """SIGSTOP the tree, top down, recording it: nothing forked after the last poll escapes us.

        Killing a live tree from the top races with its forks: a worker forked between two polls is
        never recorded, and a stock scheduler's workers outlive it.
        """
        self._stop.set()
        with contextlib.suppress(psutil.NoSuchProcess):
            if alive(self.root):
                self.root.send_signal(signal.SIGSTOP)
        for _ in range(3):  # a child may fork until it is stopped too
            for child in self._record():
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(signal.SIGSTOP)

    def survivors(self) -> list[psutil.Process]:
        return [p for p in list(self.seen.values()) if alive(p)]  # a copy: the watcher thread adds

    def kill_survivors(self) -> None:
        self._stop.set()
        for proc in [self.root, *self.survivors()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in list(self.seen.values()):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
                proc.wait(0.5)


class SchedulerProcess:
    def __init__(self, cmd: list[str], env: dict, log_path: Path, health_port: int, reaped: bool = False,
                 own_session: bool = False) -> None:
        self.cmd, self.env, self.log_path, self.health_port = cmd, env, log_path, health_port
        #: Whether the command is our tiny parent with the job process below it (``reaper``).
        self.reaped = reaped
        #: Whether it starts in a session of its own, as systemd starts a service: every process
        #: below it that did not leave the session can then be found by it (``in_session``).
        self.own_session = own_session
        self._job_pid: int | None = None
        self.popen: subprocess.Popen | None = None
        self.watchers: list[TreeWatcher] = []
        self.exited_at: float | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, output: int | None = None) -> SchedulerProcess:
        """Start the process, its stdout and stderr to the log file or to ``output``."""
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.cmd, env=self.env, stdout=self._log if output is None else output,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=self.own_session,
        )
        self.watchers.append(TreeWatcher(self.popen.pid))
        return self

    def follow(self, pid: int) -> TreeWatcher:
        """Also watch ``pid`` (the daemon that this launcher process forked off)."""
        watcher = TreeWatcher(pid)
        self.watchers.append(watcher)
        return watcher

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def job_pid(self) -> int:
        """The job process: the command itself, or under our parent its first child."""
        if not self.reaped:
            return self.pid
        if self._job_pid is None:

            def first_child() -> int | None:
                try:
                    children = psutil.Process(self.pid).children()
                except psutil.NoSuchProcess:
                    return None
                return min(children, key=lambda p: p.create_time()).pid if children else None

            self._job_pid = wait_for(first_child, 30, message="the job process below our parent")
        return self._job_pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health_status(self) -> int | None:
        return health_status(self.health_port)

    def wait_healthy(self, timeout: float = 120, daemon: TreeWatcher | None = None) -> None:
        """Until the health-check child reports a recent scheduler heartbeat in the database."""

        def healthy() -> bool:
            if daemon is not None and not alive(daemon.root):
                raise AssertionError("the daemon exited early")
            if daemon is None and self.popen.poll() is not None:
                raise AssertionError(f"scheduler exited early with {self.popen.returncode}:\n{self.log()[-4000:]}")
            return self.health_status() == 200

        try:
            wait_for(healthy, timeout, interval=0.3, message="the scheduler to report healthy")
        except AssertionError as exc:
            if "timed out" not in str(exc):
                raise
            raise AssertionError(f"{exc}; its log ends:\n{self.log()[-4000:]}") from None

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if the process is still alive after ``timeout``."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exited_at = time.monotonic()
        return code

    def signal(self, sig: int) -> float:
        os.kill(self.pid, sig)
        return time.monotonic()

    # -- what is left behind --------------------------------------------------------------------

    def descendants_named(self, fragment: str) -> list[psutil.Process]:
        found = []
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if fragment in " ".join(proc.cmdline()) or fragment in proc.name():
                    found.append(proc)
        return found

    def listening_on(self, port: int) -> list[psutil.Process]:
        """The descendants with a listening TCP socket on ``port`` (serve-logs, health check)."""
        found = []
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                       for c in proc.net_connections("tcp")):
                    found.append(proc)
        return found

    @property
    def seen(self) -> dict[tuple[int, float], psutil.Process]:
        return {key: proc for watcher in self.watchers for key, proc in list(watcher.seen.items())}

    def survivors(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if alive(p)]

    def in_session(self) -> list[psutil.Process]:
        """The living processes of its session (``own_session``): found without knowing their pids."""
        assert self.own_session, "started in the caller's session: its session is the test's too"
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                if proc.pid != self.pid and os.getsid(proc.pid) == self.pid and alive(proc):
                    found.append(proc)
        return found

    def below_job(self) -> list[psutil.Process]:
        """The job process's own descendants that are alive (not the job itself)."""
        return [p for p in self.survivors() if p.pid != self.job_pid]

    def survivors_after(self, timeout: float) -> list[psutil.Process]:
        """Descendants still alive once ``timeout`` has passed (returns early when none are)."""
        deadline = time.monotonic() + timeout
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.survivors()

    def cleanup(self) -> None:
        """Kill, by pid, the scheduler and anything it forked that is still alive, then reap."""
        for watcher in self.watchers:
            watcher.freeze()
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        for watcher in self.watchers:
            watcher.kill_survivors()
        if hasattr(self, "_log"):
            self._log.close()

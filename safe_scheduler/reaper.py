"""The tiny parent above the job process: every descendant dies with the job, however it started.

``forkhook`` ties a child to the job process only where our code runs in that child (a plain
``os.fork`` from the job). Children started by exec (``subprocess``; multiprocessing's ``spawn``;
workers forked by the ``forkserver``, another interpreter) and grandchildren that called ``setsid``
run none of it, and a ``kill -9`` of the job left them all running (issue: start methods). So, as
tini does, the command the user starts is a small parent that:

* marks itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process below it that loses its
  parent is re-parented here, not to init, so nothing slips out of its tree, whatever started it;
* starts the job process (the same command, run again) and forwards signals to it;
* reaps whatever ends below it, for as long as it runs;
* once the job process is gone, however it died, stops everything still below it (SIGTERM and
  ``child_stop_timeout`` if the job was killed, so that tasks can still cancel their work; SIGKILL;
  reap) and exits with the job's exit code, or 128 + the signal that killed it.

The parent imports only the standard library and ``prctl`` (no Airflow, no psutil), starts no
thread, writes nothing (so a full pipe cannot hold it), and lowers its OOM score where it may, so
that the OOM killer's pick is the job process, whose death it handles. It reads no configuration:
the job, once it has read and validated the settings, hands the parent the one it needs
(``child_stop_timeout``) through a pipe (``Parent.tell``). The job process in turn gets
SIGTERM when this parent dies (``PR_SET_PDEATHSIG``, ``follow_parent``) and stops its own tree
while that tree is still whole, within its usual deadline.

Why not tini, dumb-init or systemd's ``KillMode=control-group`` alone: tini and dumb-init would have
to be installed and put in front of our command by every user (the official image's entrypoint
already runs as PID 1 without ``-s``), and neither knows our grace for tasks; a cgroup kill exists
only under systemd (and Kubernetes only on pod deletion), not under supervisord or a shell. The
parent here is the same idea, always there, and costs one small process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import NoReturn

from safe_scheduler.prctl import PR_SET_CHILD_SUBREAPER, prctl, set_death_signal

#: Set for the job process: "<the parent's pid>:<the fd to tell it the settings on>". Its presence
#: means "you are the job".
PARENT_ENV = "_SAFE_SCHEDULER_PARENT"
#: Signals a supervisor or a terminal sends that belong to the job (SIGKILL/SIGSTOP cannot be caught).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: Our OOM score adjustment. Lowering it needs CAP_SYS_RESOURCE, which the official image's user
#: (uid 50000) lacks; without it our few MB already make us the OOM killer's last choice.
OOM_SCORE_ADJ = -500
#: Seconds between two looks at what is left below us, once the job is gone.
POLL = 0.05
#: Seconds SIGKILL is given to take everything below us before the parent exits regardless.
KILL_WAIT = 5.0


class Parent:
    """The job's view of the parent above it: its pid (0 where there is none: ``-D``, not Linux)."""

    def __init__(self, pid: int = 0, fd: int = -1) -> None:
        self.pid = pid
        self._fd = fd
        #: Why the job gets no death signal from the parent ("" where it does, or there is none).
        self.no_death_signal = ""

    def tell(self, child_stop_timeout: float) -> None:
        """Hand the parent the settings it needs, read and validated once, by the job."""
        if self._fd < 0:
            return
        try:
            os.write(self._fd, json.dumps({"child_stop_timeout": child_stop_timeout}).encode())
        except OSError:
            pass  # the parent is gone: the death signal is on its way
        finally:
            os.close(self._fd)
            self._fd = -1


def wanted(argv: list[str]) -> bool:
    """Whether this process should be the parent: not in the job itself, and not for ``-D`` (the
    daemon leaves its launcher behind, which is what ``-D`` is for)."""
    if PARENT_ENV in os.environ or not sys.platform.startswith("linux"):
        return False
    return not any(arg in ("-D", "--daemon") for arg in argv)


def follow_parent() -> Parent:
    """In the job process: SIGTERM when the parent dies, so that it stops its tree itself."""
    pid, _, fd = os.environ.pop(PARENT_ENV, "").partition(":")
    if not pid:
        return Parent()
    parent = Parent(int(pid), int(fd) if fd else -1)
    if parent._fd >= 0:
        os.set_inheritable(parent._fd, False)  # nothing the job starts may keep the parent waiting
    try:
        set_death_signal(signal.SIGTERM, parent.pid)
    except OSError as exc:
        parent.no_death_signal = f"prctl: {exc}"
    return parent


def _told(read_end: int) -> float:
    """What the job tells us (``Parent.tell``): its ``child_stop_timeout``. Blocks until the job has
    told or is gone; a job that never told has started nothing of its own yet: no grace."""
    data = b""
    try:
        while True:
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        os.close(read_end)
    try:
        return float(json.loads(data or b"{}").get("child_stop_timeout", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def _job_command(name: str, argv: list[str]) -> list[str]:
    """This same command, run again as the job process (the same script, so ``ps`` shows it)."""
    script = sys.argv[0]
    if script.endswith(os.path.join("safe_scheduler", "__main__.py")):  # python -m safe_scheduler
        return [sys.executable, "-m", "safe_scheduler", *argv]
    if os.path.isfile(script) and not script.endswith(os.path.join("safe_scheduler", "entry.py")):
        return [sys.executable, script, *argv]  # the console script
    return [sys.executable, "-m", "safe_scheduler.entry", name, *argv]  # python -m …entry, python -c


def _below_us() -> list[int]:
    """Every process whose chain of parents leads to us (read from /proc: no psutil here)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    data = stat.read()
                parents[int(entry)] = int(data[data.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    below: list[int] = []
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        below.extend(frontier)
    return below


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _reap() -> bool:
    """Reap whatever has ended below us; False once we have no child left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _sweep(child_stop_timeout: float) -> None:
    """Stop everything below us; SIGTERM and up to ``child_stop_timeout`` first, where there is one.

    What cannot be killed (another user's process, one stuck in the kernel) is given up after
    ``KILL_WAIT``: the parent must exit too, and its exit hands those to init.
    """
    if child_stop_timeout > 0 and _below_us():
        _signal_all(_below_us(), signal.SIGTERM)
        deadline = time.monotonic() + child_stop_timeout
        while _reap() and _below_us() and time.monotonic() < deadline:
            time.sleep(POLL)
    deadline = time.monotonic() + KILL_WAIT
    while True:
        left = _below_us()
        _signal_all(left, signal.SIGKILL)
        if (not _reap() and not left) or time.monotonic() > deadline:
            return
        time.sleep(POLL)


def _oom_score_adj(value: str | int) -> str:
    """Set our OOM score adjustment where the kernel lets us; return what it was."""
    path = "/proc/self/oom_score_adj"
    try:
        with open(path) as current:
            before = current.read().strip()
    except OSError:
        return "0"
    try:
        with open(path, "w") as adj:
            adj.write(str(value))
    except OSError:
        pass  # lowering it needs CAP_SYS_RESOURCE
    return before


def _exit_code(status: int) -> int:
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run(name: str, argv: list[str]) -> NoReturn:
    """Be the parent: start the job process, wait for it, leave nothing behind, exit with its code."""
    command = _job_command(name, argv)
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:  # a seccomp profile that forbids it: run as the job, as before
        os.environ[PARENT_ENV] = ""
        os.execv(sys.executable, command)
    inherited = _oom_score_adj(OOM_SCORE_ADJ)
    me = os.getpid()
    read_end, write_end = os.pipe()
    job = os.fork()
    if job == 0:
        try:
            os.close(read_end)
            os.set_inheritable(write_end, True)
            _oom_score_adj(inherited)  # the job is the OOM killer's pick, as it was without us
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which forwards it once
            os.environ[PARENT_ENV] = f"{me}:{write_end}"
            if "WATCHDOG_PID" in os.environ:  # systemd's watchdog is fed by the job
                os.environ["WATCHDOG_PID"] = str(os.getpid())
            os.execv(sys.executable, command)
        finally:
            os._exit(127)

    reaped = False

    def forward(signum: int, frame: object) -> None:
        if not reaped:  # once reaped, its pid may be someone else's
            try:
                os.kill(job, signum)
            except OSError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    os.close(write_end)
    child_stop_timeout = _told(read_end)
    status = 1 << 8
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == job:
            reaped = True
            break
    # The job stops its own tree on every way out it lives through; what is left now was missed
    # (started by exec, its own session) or the job was killed: a killed job's tasks get their grace.
    _sweep(child_stop_timeout if os.WIFSIGNALED(status) else 0.0)
    os._exit(_exit_code(status))

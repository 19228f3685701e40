"""The tiny parent above the job process: every descendant dies with the job, however it started.

``forkhook`` ties a child to the job process only where our code runs in that child (a plain
``os.fork`` from the job). Children started by exec (``subprocess``; multiprocessing's ``spawn``;
workers forked by the ``forkserver``, another interpreter) and grandchildren that called ``setsid``
run none of it, and a ``kill -9`` of the job left them all running. So, as tini does, the command
the user starts is a small parent that, from its first loop to its last:

* is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process below it that loses its parent is
  re-parented here, not to init, so nothing slips out of its tree, whatever started it;
* runs the job process (the same command, run again), forwards signals to it, and reaps whatever
  ends below it, while it waits for the job to tell it what it needs (``Parent.tell``);
* once the job process is gone, however it died, stops everything still below it and exits with
  the job's code, or 128 + the signal that killed it (``exitcodes.of_status``).

After a job that ended by itself (it stopped its own tree), what is left was missed and is killed
at once. After a job that was killed, the processes that hold its lifeline (``forkhook``: executor
and pool workers, and below them the tasks they run) end by themselves: an idle one at once, one
that runs a task once the task has finished and reported its own state, within
``orphaned_task_timeout`` and its cleanup. Everything else (servers, a plain subprocess, a
grandchild in its own session) is killed at once, so that no port stays taken. The parent waits
for the rest as long as the job said they may take, then kills what is left and exits.

The parent imports only the standard library, ``prctl`` and ``exitcodes`` (no Airflow, no psutil),
starts no thread, writes nothing (so a full pipe cannot hold it), and lowers its OOM score where it
may, so that the OOM killer's pick is the job process, whose death it handles. It reads no
configuration: the job tells it. The job in turn gets SIGTERM when this parent dies
(``PR_SET_PDEATHSIG``, ``follow_parent``): an unplanned end, in which the job lets its tasks finish
and frees its ports at once.

Why not tini, dumb-init or systemd's ``KillMode=control-group`` alone: tini and dumb-init would have
to be put in front of our command by every user (the official image's entrypoint already runs as
PID 1 without ``-s``), and neither knows our grace for tasks; a cgroup kill exists only under
systemd (and Kubernetes only on pod deletion), not under supervisord or a shell.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time

from safe_scheduler.base import exitcodes
from safe_scheduler.base.prctl import PR_SET_CHILD_SUBREAPER, prctl, set_death_signal

TYPE_CHECKING = False  # typing itself is not imported: the parent's every import is memory it keeps
if TYPE_CHECKING:
    from typing import NoReturn

#: Set for the job process: "<the parent's pid>:<the fd to tell it on>". Its presence means "you are the job".
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

    def gone(self) -> bool:
        """Whether the parent died: the job was re-parented (the death signal came with it)."""
        return bool(self.pid) and os.getppid() != self.pid

    def tell(self, orphans_gone_within: float, lifeline: str) -> None:
        """Hand the parent what it needs, read and validated once by the job: how long the processes
        that hold the job's ``lifeline`` (a ``pipe:[inode]``) may outlive a killed job."""
        if self._fd < 0:
            return
        try:
            os.write(self._fd, f"{orphans_gone_within!r} {lifeline}".encode())
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


class _Told:
    """What the job tells us, read as it comes, without ever blocking the reap."""

    def __init__(self, read_end: int) -> None:
        self.fd = read_end
        self._data = b""
        #: Seconds the lifeline's holders may outlive a killed job; 0 until told (nothing of its own yet).
        self.orphans_gone_within = 0.0
        self.lifeline = ""

    def read(self) -> None:
        try:
            chunk = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._data += chunk
            return
        os.close(self.fd)
        self.fd = -1
        # "<seconds> <lifeline>": no json here, since the parent keeps every module it imports.
        seconds, _, lifeline = self._data.decode(errors="replace").partition(" ")
        try:
            self.orphans_gone_within = float(seconds)
        except ValueError:
            return
        self.lifeline = lifeline


def _job_command(name: str, argv: list[str]) -> list[str]:
    """This same command, run again as the job process (the same script, so ``ps`` shows it)."""
    script = sys.argv[0]
    if script.endswith(os.path.join("safe_scheduler", "__main__.py")):  # python -m safe_scheduler
        return [sys.executable, "-m", "safe_scheduler", *argv]
    if os.path.isfile(script) and not script.endswith(os.path.join("safe_scheduler", "entry.py")):
        return [sys.executable, script, *argv]  # the console script
    return [sys.executable, "-m", "safe_scheduler.entry", name, *argv]  # python -m …entry, python -c


def _tree() -> dict[int, int]:
    """pid -> parent pid of every process below us (read from /proc: no psutil here)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    data = stat.read()
                parents[int(entry)] = int(data[data.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    below: dict[int, int] = {}
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        below.update((pid, parents[pid]) for pid in frontier)
    return below


def _holds(pid: int, lifeline: str) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lifeline:
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def _spared(tree: dict[int, int], lifeline: str) -> set[int]:
    """The lifeline's holders and everything below them: they end by themselves (``forkhook``)."""
    spared = {pid for pid in tree if lifeline and _holds(pid, lifeline)}
    grown = True
    while grown:
        more = {pid for pid, ppid in tree.items() if ppid in spared} - spared
        spared |= more
        grown = bool(more)
    return spared


def _signal_all(pids: object, sig: int) -> None:
    for pid in pids:  # type: ignore[attr-defined]
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _reap(job: int = 0) -> int | None:
    """Reap whatever has ended below us; the job's status if it is among them. Raises
    ChildProcessError once we have no child left at all."""
    while True:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return None
        if pid == job:
            return status


def _reap_quietly() -> bool:
    """Reap what has ended; False once we have no child left."""
    try:
        _reap()
    except ChildProcessError:
        return False
    return True


def _sweep(killed: bool, told: _Told) -> None:
    """Stop everything below us once the job is gone (the module's docstring says how)."""
    if killed and told.orphans_gone_within > 0:
        tree = _tree()
        spared = _spared(tree, told.lifeline)
        _signal_all(set(tree) - spared, signal.SIGKILL)
        deadline = time.monotonic() + told.orphans_gone_within
        while _reap_quietly() and _tree() and time.monotonic() < deadline:
            time.sleep(POLL)
    deadline = time.monotonic() + KILL_WAIT
    while True:
        left = list(_tree())
        _signal_all(left, signal.SIGKILL)
        if (not _reap_quietly() and not left) or time.monotonic() > deadline:
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


def run(name: str, argv: list[str]) -> NoReturn:
    """Be the parent: start the job process, reap from the first loop, wait for the job, leave
    nothing behind, exit with its code."""
    command = _job_command(name, argv)
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:  # a seccomp profile that forbids it: run as the job, as before
        os.environ[PARENT_ENV] = ""
        os.execv(sys.executable, command)
    inherited = _oom_score_adj(OOM_SCORE_ADJ)
    me = os.getpid()
    read_end, write_end = os.pipe()
    # Every SIGCHLD, and every forwarded signal, wakes the loop below through this pipe.
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
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
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.execv(sys.executable, command)
        finally:
            os._exit(127)  # the exec failed: the child of a fork runs nothing else
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
    os.set_blocking(read_end, False)
    told = _Told(read_end)
    status = 1 << 8
    while True:
        try:
            found = _reap(job)
        except ChildProcessError:
            break
        if found is not None:
            status, reaped = found, True
            break
        try:
            ready, _, _ = select.select([fd for fd in (told.fd, wake_read) if fd >= 0], [], [])
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            continue
        if told.fd in ready:
            told.read()
        if wake_read in ready:
            try:
                while os.read(wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
    for _ in range(64):  # what the job wrote before it died, up to the end of the pipe
        if told.fd < 0:
            break
        told.read()
    # The job stops its own tree on every way out it lives through; what is left now was missed
    # (started by exec, its own session), or the job was killed: then its tasks get their time.
    _sweep(os.WIFSIGNALED(status), told)
    os._exit(exitcodes.of_status(status))

"""The tiny parent alone, with real processes and no Airflow: a stand-in job starts children every
way the kernel allows (spawn, a new session, a double fork, subprocess), then is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from harness.procs import alive, wait_for
from safe_scheduler.children import parent as reaper

pytestmark = pytest.mark.all_versions

# Run as the job by our parent: it follows the parent (as cli does), starts children that no code
# of ours runs in, writes their pids, and waits; SIGTERM ends it with code 0.
FAKE_JOB = """
    import multiprocessing
    import os
    import signal
    import subprocess
    import sys
    import time

    from safe_scheduler.children import parent as reaper


    def main(out):
        reaper.follow_parent().tell(float(os.environ["AIRFLOW__SAFE_SCHEDULER__CHILD_STOP_TIMEOUT"]), "")
        signal.signal(signal.SIGTERM, lambda *_: (open(out + ".term", "w").close(), os._exit(0)))
        # Its own session, as a task's `setsid` or `start_new_session=True` does.
        pids = [subprocess.Popen(["sleep", "600"], start_new_session=True).pid]
        # A double fork: the grandchild is orphaned at once, in its own session.
        if os.fork() == 0:
            if os.fork() == 0:
                os.setsid()
                with open(out + ".daemon.tmp", "w") as daemon:  # renamed: never read half-written
                    daemon.write(str(os.getpid()))
                os.rename(out + ".daemon.tmp", out + ".daemon")
                os.execvp("sleep", ["sleep", "600"])
            os._exit(0)
        # multiprocessing's spawn: a fresh interpreter, no fork hook of ours in it.
        child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
        child.start()
        pids.append(child.pid)
        deadline = time.monotonic() + 30
        while not os.path.exists(out + ".daemon") and time.monotonic() < deadline:
            time.sleep(0.05)
        pids.append(int(open(out + ".daemon").read()))
        with open(out + ".tmp", "w") as tmp:
            tmp.write(" ".join(map(str, pids)))
        os.rename(out + ".tmp", out)
        while True:
            time.sleep(1)


    if __name__ == "__main__":
        main(sys.argv[1])
"""


def _start(tmp_path: Path, grace: float = 2.0) -> tuple[subprocess.Popen, Path]:
    job = tmp_path / "fake_job.py"
    job.write_text(textwrap.dedent(FAKE_JOB))
    pids = tmp_path / "pids"
    # Our parent re-runs sys.argv[0] as the job: here that is the stand-in.
    launcher = (
        "import sys; from safe_scheduler.children import parent as reaper; "
        f"sys.argv = [{str(job)!r}, {str(pids)!r}]; reaper.run('scheduler', sys.argv[1:])"
    )
    env = dict(os.environ, AIRFLOW__SAFE_SCHEDULER__CHILD_STOP_TIMEOUT=str(grace))
    env.pop(reaper.PARENT_ENV, None)
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env, stdin=subprocess.DEVNULL)
    wait_for(pids.exists, 60, message="the stand-in job's children")
    return parent, pids


def _job(parent: subprocess.Popen) -> psutil.Process:
    return psutil.Process(parent.pid).children()[0]


def _all_gone(pids: list[int], timeout: float) -> list[int]:
    procs = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p.pid for p in procs if alive(p)]


def _cleanup(parent: subprocess.Popen, pids: list[int]) -> None:
    for pid in [parent.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    parent.wait(10)


def test_job_killed_nothing_left_and_128_plus_signal(tmp_path):
    parent, pid_file = _start(tmp_path)
    pids = [int(p) for p in pid_file.read_text().split()]
    job = _job(parent)
    try:
        assert all(psutil.pid_exists(pid) for pid in pids)
        # Nothing of ours tied these to the job: only the parent can stop them.
        job.send_signal(signal.SIGKILL)
        assert parent.wait(30) == 128 + signal.SIGKILL
        assert _all_gone(pids, 5) == []
    finally:
        _cleanup(parent, pids)


def test_signals_are_forwarded_and_the_code_passed_through(tmp_path):
    parent, pid_file = _start(tmp_path)
    pids = [int(p) for p in pid_file.read_text().split()]
    try:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
        assert Path(str(pid_file) + ".term").exists()  # the job got it, and exited 0 itself
        # It exited on its own, leaving its children: the parent killed them without a grace.
        assert _all_gone(pids, 5) == []
    finally:
        _cleanup(parent, pids)


def test_parent_killed_the_job_gets_sigterm(tmp_path):
    parent, pid_file = _start(tmp_path)
    pids = [int(p) for p in pid_file.read_text().split()]
    job = _job(parent)
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not alive(job), 10, message="the job to follow its parent")
        assert Path(str(pid_file) + ".term").exists()
    finally:
        _cleanup(parent, pids)


def test_parent_is_small_and_runs_no_thread(tmp_path):
    parent, pid_file = _start(tmp_path)
    pids = [int(p) for p in pid_file.read_text().split()]
    try:
        proc = psutil.Process(parent.pid)
        assert proc.num_threads() == 1
        assert proc.memory_info().rss < 32 * 2**20, proc.memory_info()
    finally:
        _cleanup(parent, pids)


def test_parent_imports_only_what_it_needs():
    """The parent keeps every module it imports for as long as the job runs, in every deployment: by
    PSS it is the part of our memory that stock has none of. json and typing (with re and enum
    below them) were 1.3 MB of it; what it needs is the system calls and the exit-code table."""
    probe = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        from safe_scheduler import entry
        from safe_scheduler.children import parent
        print(" ".join(sorted(set(sys.modules) - before)))
    """)
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.split())
    ours = {name for name in loaded if name.split(".")[0] == "safe_scheduler"}
    assert ours == {"safe_scheduler", "safe_scheduler.entry", "safe_scheduler.children",
                    "safe_scheduler.children.parent", "safe_scheduler.base", "safe_scheduler.base.exitcodes",
                    "safe_scheduler.base.prctl"}, ours
    heavy = loaded & {"json", "typing", "re", "collections.abc", "logging", "psutil", "threading", "airflow"}
    assert not heavy, f"the parent imports {sorted(heavy)}"

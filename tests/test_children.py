"""Child process stop and death signal, with real processes and no Airflow."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from procs import alive, wait_for
from safe_scheduler import children


def _deaf_with_grandchild(pid_queue) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    pid_queue.put(grandchild.pid)
    time.sleep(600)


def _polite(pid_queue) -> None:
    pid_queue.put(os.getpid())
    time.sleep(600)


def test_child_ignoring_sigterm_is_killed_with_its_tree_after_the_timeout():
    queue = multiprocessing.SimpleQueue()
    child = children.ChildProcess("deaf", lambda: _deaf_with_grandchild(queue), stop_timeout=1.0)
    child.start()
    grandchild = psutil.Process(queue.get())
    started = time.monotonic()
    assert child.stop() is True
    took = time.monotonic() - started
    assert took >= 1.0  # it was given its timeout before the kill
    assert not alive(grandchild)
    assert not psutil.pid_exists(child.pid) or not alive(psutil.Process(child.pid))


def test_polite_child_stops_on_sigterm_without_kill():
    queue = multiprocessing.SimpleQueue()
    child = children.ChildProcess("polite", lambda: _polite(queue), stop_timeout=10.0)
    child.start()
    queue.get()
    assert child.stop() is False
    assert child._process.exitcode == -signal.SIGTERM


def test_stop_descendants_takes_everything_below_us():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(3)]
    assert children.stop_descendants(timeout=5) >= 3
    for proc in procs:
        assert proc.wait(5) == -signal.SIGTERM


DEATH_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from safe_scheduler import children

    children.install_fork_hook()
    worker = multiprocessing.Process(target=time.sleep, args=(600,))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(600)
    """
)


def test_forked_child_dies_with_a_sigkilled_parent():
    parent = subprocess.Popen([sys.executable, "-c", DEATH_SIGNAL_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        worker = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not alive(worker), 10, message="the orphaned worker to die")
    finally:
        parent.kill()
        parent.wait(10)


# Airflow 3's LocalExecutor worker forwards SIGTERM to the task it supervises, and the task runner
# answers SIGTERM with ``on_kill()`` and then carries on: a death signal alone ends neither.
CATCHING_WORKER_SCRIPT = textwrap.dedent(
    """
    import logging, multiprocessing, os, signal, sys, time
    from safe_scheduler import children

    children.install_fork_hook(orphan_grace=2.0)

    def task(queue, marker):
        signal.signal(signal.SIGTERM, lambda signum, frame: open(marker, "w").write("on_kill ran"))
        queue.put(os.getpid())
        while True:
            time.sleep(1)

    def worker(queue, marker):
        task_pid = os.fork()
        if task_pid == 0:
            task(queue, marker)
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(task_pid, signum))
        if sys.argv[2] == "logging-stuck":
            logging._lock.acquire()  # held by the main thread for good, as a swallowed SystemExit can leave it
        queue.put(os.getpid())
        while True:
            time.sleep(1)

    if __name__ == "__main__":
        queue = multiprocessing.SimpleQueue()
        proc = multiprocessing.Process(target=worker, args=(queue, sys.argv[1]))
        proc.start()
        ready = {queue.get(), queue.get()}  # both have their handlers in place
        print(proc.pid, (ready - {proc.pid}).pop(), flush=True)
        time.sleep(600)
    """
)


@pytest.mark.parametrize("logging_state", ["logging-free", "logging-stuck"])
def test_child_that_catches_its_death_signal_still_follows_a_sigkilled_parent(tmp_path, logging_state):
    marker = tmp_path / "on_kill"
    parent = subprocess.Popen([sys.executable, "-c", CATCHING_WORKER_SCRIPT, str(marker), logging_state],
                              stdout=subprocess.PIPE, text=True)
    started: list[psutil.Process] = []
    try:
        started += [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
        worker, task = started
        parent.kill()
        parent.wait(10)
        # The task is given the grace to clean up, then the worker takes it and itself down.
        wait_for(lambda: not alive(worker) and not alive(task), 2.0 + 10, message="worker and task to die")
        assert marker.read_text() == "on_kill ran"
    finally:
        parent.kill()
        parent.wait(10)
        for proc in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

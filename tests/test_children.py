"""Child process stop, death signal and lifeline, with real processes and no Airflow."""

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

from harness.procs import alive, wait_for
from safe_scheduler.children import servers as children
from safe_scheduler.children import tree


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
    child = children.ChildProcess("deaf", lambda: _deaf_with_grandchild(queue))
    child.start()
    grandchild = psutil.Process(queue.get())
    started = time.monotonic()
    outcome = children.stop_all([child], child_stop_timeout=1.0)
    took = time.monotonic() - started
    assert took >= 1.0  # it was given its grace before the kill
    assert {p.pid for p in outcome.killed} == {child.pid, grandchild.pid}
    assert not alive(grandchild)
    assert child.process.exitcode == -signal.SIGKILL


def test_polite_child_stops_on_sigterm_without_kill():
    queue = multiprocessing.SimpleQueue()
    child = children.ChildProcess("polite", lambda: _polite(queue))
    child.start()
    queue.get()
    outcome = children.stop_all([child], child_stop_timeout=10.0)
    assert not outcome.killed
    assert child.process.exitcode == -signal.SIGTERM


def test_two_deaf_children_cost_one_grace_not_two():
    """Every target is signalled before any is waited for: the stop takes one grace period."""
    queues = [multiprocessing.SimpleQueue() for _ in range(2)]
    deaf = [children.ChildProcess(f"deaf-{i}", lambda q=q: _deaf_with_grandchild(q)) for i, q in enumerate(queues)]
    for child in deaf:
        child.start()
    for queue in queues:
        queue.get()
    started = time.monotonic()
    outcome = children.stop_all(deaf, child_stop_timeout=2.0)
    took = time.monotonic() - started
    assert len(outcome.killed) == 4  # both children and both grandchildren
    assert 2.0 <= took < 2.0 + tree.KILL_WAIT + 1.5, f"took {took:.1f}s: not one grace period"


def test_stop_is_cut_to_the_time_the_deadline_leaves():
    queue = multiprocessing.SimpleQueue()
    child = children.ChildProcess("deaf", lambda: _deaf_with_grandchild(queue))
    child.start()
    queue.get()
    deadline = time.monotonic() + 2.0
    started = time.monotonic()
    children.stop_all([child], child_stop_timeout=30.0, room=lambda: deadline - time.monotonic() - 1.0)
    assert time.monotonic() - started < 2.0 + tree.KILL_WAIT, "the stop outlived the deadline"
    assert child.process.exitcode == -signal.SIGKILL


def test_stop_takes_everything_below_us():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(3)]
    outcome = tree.stop(tree.descendants(), grace=5)
    assert len(outcome.stopped) >= 3
    for proc in procs:
        assert proc.wait(5) == -signal.SIGTERM


DEATH_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from safe_scheduler.children import forkhook

    forkhook.install(5.0)
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
    from safe_scheduler.children import forkhook

    # A cleanup time, as every real job has (task_cleanup_timeout): with none, the SIGKILL that
    # follows the SIGTERM at once raced the task's handler, and lost once on a loaded machine.
    forkhook.install(child_stop_timeout=2.0, task_cleanup_timeout=2.0)

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


# Two threads fork at once, over and over: the main thread's children must carry the death signal
# and the helper thread's must not (it would fire when that thread ends). They fork in a worker
# below the job: the job's own children hold the lifeline and get no death signal at all. A fast switch interval
# makes the GIL change hands inside the fork path, where a value set by a before-fork hook could be
# overwritten by the other thread before this one forks.
CONCURRENT_FORKS_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    from safe_scheduler.children import forkhook
    from safe_scheduler.base.prctl import death_signal

    forkhook.install(5.0)
    read_end, write_end = os.pipe()
    worker = os.fork()
    if worker:
        os.close(write_end)
        with os.fdopen(read_end) as reports:
            sys.stdout.write(reports.read())
        os.waitpid(worker, 0)
        sys.exit(0)
    sys.setswitchinterval(1e-6)

    def fork_and_report(tag):
        pid = os.fork()
        if pid == 0:
            os.write(write_end, f"{tag} {death_signal()}\\n".encode())
            os._exit(0)
        os.waitpid(pid, 0)

    for _ in range(int(sys.argv[1])):
        barrier = threading.Barrier(2)
        helper = threading.Thread(target=lambda: (barrier.wait(), fork_and_report("helper")))
        helper.start()
        barrier.wait()
        fork_and_report("main")
        helper.join()
    os._exit(0)
    """
)


def test_only_main_thread_children_get_the_death_signal_under_concurrent_forks():
    reps = 400
    done = subprocess.run([sys.executable, "-c", CONCURRENT_FORKS_SCRIPT, str(reps)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reports = [line.split() for line in done.stdout.splitlines()]
    assert len(reports) == 2 * reps
    wrong = [(tag, sig) for tag, sig in reports if int(sig) != (signal.SIGTERM if tag == "main" else 0)]
    assert not wrong, f"{len(wrong)} of {2 * reps} children got the wrong death signal: {wrong[:5]}"


# A child that runs as another user (a task under ``run_as_user``/sudo): once the parent has
# dropped to an unprivileged uid of its own, it may not signal that child. The stop must say so.
UNKILLABLE_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    from safe_scheduler.children import tree

    child = os.fork()
    if child == 0:
        for fd in (1, 2):  # let the test read our parent's output to the end
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        os.setuid(int(sys.argv[1]))
        time.sleep(600)
        os._exit(0)
    print(child, flush=True)
    os.setuid(int(sys.argv[2]))
    started = time.monotonic()
    outcome = tree.stop(tree.descendants(), grace=1.0, what="test children")
    print(time.monotonic() - started, [(p.pid, why) for p, why in outcome.unkillable], flush=True)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_a_child_that_cannot_be_killed_is_named_with_the_reason():
    done = None
    child_pid = None
    proc = subprocess.Popen([sys.executable, "-c", UNKILLABLE_SCRIPT, "61234", "61235"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child_pid = int(proc.stdout.readline())
        out, err = proc.communicate(timeout=60)
        done = (proc.returncode, out, err)
    finally:
        proc.kill()
        if child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, psutil.NoSuchProcess):
                psutil.Process(child_pid).wait(5)
    code, out, err = done
    assert code == 0, err
    took, unkillable = out.split(" ", 1)
    assert float(took) < 1.0 + tree.KILL_WAIT + 2
    assert str(child_pid) in unkillable and "permission denied" in unkillable
    assert f"Could not stop pid {child_pid}" in err and "uid 61234" in err, err


def _with_lingering_grandchild(pid_queue) -> None:
    """A server whose own child outlives it: the child holds the server's sentinel open."""
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(600)
        os._exit(0)
    pid_queue.put(grandchild)
    time.sleep(600)


@pytest.mark.parametrize("lingering", [False, True], ids=["alone", "its-child-lingers"])
def test_a_dead_server_is_noticed_and_started_again(lingering):
    """The watcher waits on the servers' sentinels: a killed server is seen and restarted by
    ``restart_due``; one whose child keeps its sentinel open is seen by the slow look."""
    queue = multiprocessing.SimpleQueue()
    target = (lambda: _with_lingering_grandchild(queue)) if lingering else (lambda: _polite(queue))
    servers = children.Servers([children.ChildProcess("server", target)])
    servers.start()
    child = servers.children[0]
    grandchild = queue.get() if lingering else None
    first = child.pid
    try:
        if not lingering:
            queue.get()
        os.kill(first, signal.SIGKILL)
        limit = 10 if lingering else 3  # SLOW_LOOK is 5 s
        wait_for(lambda: child.restart_at is not None, limit, message="the death noticed")
        wait_for(lambda: (servers.restart_due(), child.pid != first)[1], 10, message="the restart")
        wait_for(lambda: alive(psutil.Process(child.pid)), 5, message="the new server")
    finally:
        servers.stop(child_stop_timeout=1.0)  # the new server, with its own child
        if grandchild is not None:  # the first server's child, orphaned by its kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)

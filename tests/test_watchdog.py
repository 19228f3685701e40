"""The shutdown deadline in a real process: a hang in shutdown ends with code 3 and a stack dump; a
hang that holds the GIL ends through faulthandler; neither waits on output nobody reads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from harness.procs import fill_pipe
from safe_scheduler.base import exitcodes
from safe_scheduler.shutdown import watchdog


PRELUDE = textwrap.dedent(
        """
        import logging, sys, threading
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        from safe_scheduler.base.exitcodes import Cause
        from safe_scheduler.shutdown.budget import TimePlan
        from safe_scheduler.shutdown.owner import Shutdown
        from safe_scheduler.shutdown.signals import SignalListener
        dog = Shutdown(TimePlan(1.5, 0.0), name="scheduler")

        def watch_signals():
            SignalListener(lambda name: dog.begin(f"received {name}", Cause.SIGNAL)).start()
        """
)


def _run(body: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    script = PRELUDE + textwrap.dedent(body)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def _forced_exit_in_cleanup(setup: str = "") -> float:
    """Run ``setup``, then a shutdown whose cleanup never returns; check the forced exit names it."""
    done, took = _run(
        textwrap.dedent(setup) + textwrap.dedent(
            """
            def stuck_in_cleanup():
                threading.Event().wait()
            dog.begin("test")
            stuck_in_cleanup()
            """),
        timeout=30,
    )
    assert done.returncode == exitcodes.FORCED, done.stderr
    assert "stuck_in_cleanup" in done.stderr.split("Thread stacks at forced exit", 1)[1]
    return took


def test_blocked_shutdown_is_forced_with_stack_dump():
    assert _forced_exit_in_cleanup() < 1.5 + 5


def test_forced_exit_inside_an_atexit_handler_still_dumps_the_stacks():
    """Python 3.12+ starts no thread once the interpreter is finalizing, i.e. while an atexit
    handler runs; the forced exit's bounded log thread could not start and it said nothing (seen
    on 2.11.2 with Python 3.12). On older Pythons the handler refuses threads the same way."""
    done, took = _run(
        """
        import atexit

        def flush_forever_at_exit():
            if sys.version_info < (3, 12):  # what 3.12+ does itself from here on
                def refuse(self):
                    raise RuntimeError("can't create new thread at interpreter shutdown")
                threading.Thread.start = refuse
            threading.Event().wait()

        atexit.register(flush_forever_at_exit)
        dog.begin("test")
        sys.exit(0)
        """,
        timeout=30,
    )
    assert done.returncode == exitcodes.FORCED, done.stderr
    assert "flush_forever_at_exit" in done.stderr.split("Thread stacks at forced exit", 1)[1], done.stderr
    assert took < 1.5 + 5


def test_forced_exit_waits_for_a_queue_listener_to_write_the_stack_dump():
    """Airflow 2's triggerer logs through a QueueHandler. Its listener takes the dump off the queue
    before it writes it: an empty queue does not mean the dump is out (CI lost one that way)."""
    _forced_exit_in_cleanup(
        """
        import logging.handlers, queue, time

        class SlowStderr(logging.StreamHandler):  # a long record on a busy machine
            def emit(self, record):
                time.sleep(0.3)
                super().emit(record)

        from safe_scheduler.base.metrics import Metrics
        Metrics().incr("warm_up")  # Airflow imported, as in a triggerer: the report itself is quick

        records = queue.SimpleQueue()
        root = logging.getLogger()
        root.handlers = [logging.handlers.QueueHandler(records)]
        logging.handlers.QueueListener(records, SlowStderr(sys.stderr)).start()
        """)


def test_sigterm_arms_the_deadline_while_the_main_thread_waits_in_a_db_driver(postgres):
    """SIGTERM's Python handler cannot run while libpq waits (it retries on EINTR): stock Airflow
    never notices the signal. The wakeup-fd listener does, and the deadline ends the process."""
    done, took = _run(
        f"""
        import os, signal, psycopg2
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))   # Airflow's: would exit 0
        watch_signals()
        conn = psycopg2.connect(host="127.0.0.1", port={postgres.port}, user="airflow", dbname="airflow")
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        conn.cursor().execute("SELECT pg_sleep(600)")
        """,
        timeout=60,
    )
    assert done.returncode == exitcodes.FORCED, done.stderr
    assert took < 0.5 + 1.5 + 5


def test_gil_holding_hang_is_ended_by_faulthandler():
    done, took = _run(
        """
        import re
        dog.begin("test")
        re.match(r"(a+)+$", "a" * 64 + "b")   # catastrophic backtracking: C code holding the GIL
        """,
        timeout=60,
    )
    assert done.returncode == exitcodes.FORCED_GIL_HELD, done.stderr
    assert took < 1.5 + watchdog.BACKSTOP_MARGIN + 5
    assert "most recent call first" in done.stderr  # faulthandler's dump, written without the GIL


def test_sigterm_swallowed_inside_logging_still_ends_the_process():
    """Airflow 2's SIGTERM handler raises SystemExit. Raised inside a weakref callback (here the one
    logging uses for dead handlers), it is printed as "Exception ignored" and lost, and if it hit
    between the module lock's acquire and release the lock stays held by the main thread: the
    scheduler runs on, and every other thread that logs waits forever. Seen once on CI (2.11.2)."""
    done, took = _run(
        """
        import os, signal, weakref
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))   # Airflow 2's sigint_handler
        watch_signals()

        def remove_handler_ref(ref):            # logging._removeHandlerRef, with the signal in between
            logging._lock.acquire()
            os.kill(os.getpid(), signal.SIGTERM)
            logging._lock.release()

        class Handler: pass
        handler = Handler()
        ref = weakref.ref(handler, remove_handler_ref)
        del handler                             # SystemExit raised in the callback, and ignored
        other = threading.Thread(target=lambda: print("lock free:", logging._lock.acquire(timeout=0.2)))
        other.start(); other.join()
        threading.Event().wait()                # the scheduler carries on
        """,
        timeout=60,
    )
    # The scene is set: the signal was swallowed, and logging's lock is held for every other thread.
    assert "Exception ignored" in done.stderr and "lock free: False" in done.stdout, done.stderr
    assert done.returncode == exitcodes.FORCED, done.stderr
    assert took < 1.5 + watchdog.REPORT_GRACE + 5
    assert "received SIGTERM" in done.stderr  # why, even though logging is stuck


def test_stall_with_logging_stuck_still_ends_the_process():
    """A scheduler that stopped heartbeating while logging's lock is held by its main thread."""
    done, _ = _run(
        """
        from safe_scheduler.liveness.stall import StallWatchdog
        from safe_scheduler.base import exitcodes
        from safe_scheduler.base.metrics import Metrics
        stall = StallWatchdog(1.0, name="scheduler", on_stall=lambda why: dog.begin(why, Cause.STALLED))
        Metrics().gauge("seconds_since_heartbeat", 0)   # Airflow imported and Stats set up, as in a scheduler
        import signal; signal.signal(signal.SIGTERM, lambda *a: None)   # the job would notice it later
        logging._lock.acquire()                  # left held, as a swallowed SystemExit can leave it
        import time; print("started", time.monotonic(), flush=True)
        stall.start()
        threading.Event().wait()                # no heartbeat ever again
        """,
        timeout=60,
    )
    ended = time.monotonic()  # CLOCK_MONOTONIC: the child's readings compare (importing Airflow is slow)
    assert done.returncode == exitcodes.STALLED, done.stderr
    started = float(done.stdout.split("started ", 1)[1].split()[0])
    assert ended - started < 1.0 + 1.5 + watchdog.REPORT_GRACE + 5
    assert "no successful heartbeat from the scheduler" in done.stderr


# -- Output nobody reads: a pipe or socket whose reader stopped, filled to the brim. -----------------

def _fill_socket(sock: socket.socket) -> int:
    filled = 0
    try:
        while True:
            filled += sock.send(b"x" * 65536, socket.MSG_DONTWAIT)  # this call only: the fd stays blocking
    except BlockingIOError:
        return filled


def _run_with_output_nobody_reads(body: str, kind: str, timeout: float) -> tuple[int | None, float, bytes]:
    """Run ``body`` with stdout and stderr a full pipe (or socket) that is read only after it ended."""
    if kind == "pipe":
        read_end, write_end = os.pipe()
        reader = os.fdopen(read_end, "rb")
    else:
        ours, theirs = socket.socketpair()
        write_end = theirs.detach()
        reader = ours.makefile("rb")
    # Started with the output empty, and the parent blocks on nothing: it only ever waits.
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                            stdout=write_end, stderr=write_end, stdin=subprocess.DEVNULL)
    try:
        ready = time.monotonic() + 60
        while time.monotonic() < ready and proc.poll() is None:  # until the child said it is set
            if os.path.exists(f"/proc/{proc.pid}/fd/9"):
                break
            time.sleep(0.05)
        started = time.monotonic()
        if kind == "pipe":
            fill_pipe(write_end)
        else:
            _fill_socket(socket.socket(fileno=os.dup(write_end)))
        os.kill(proc.pid, signal.SIGUSR1)  # go
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait(10)
        os.close(write_end)
    return code, took, reader.read()


# The child opens fd 9 once it is set up (Airflow-free), then waits for SIGUSR1 to start the scene,
# so the pipe is filled while nothing of ours has written anything yet.
SET_UP = """
    import signal
    go = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: go.set())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 9)
    go.wait()
"""


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_forced_exit_with_output_nobody_reads(kind):
    """The forced exit's report cannot be written: it is abandoned, and the exit still comes."""
    code, took, _ = _run_with_output_nobody_reads(
        "import os\n" + textwrap.dedent(SET_UP) + textwrap.dedent("""
        dog.begin("test")
        logging.getLogger().info("a line that blocks the main thread for good" * 100)
        threading.Event().wait()
        """),
        kind, timeout=30,
    )
    assert code == 3, f"exit code {code} after {took:.1f}s"
    assert took < 1.5 + watchdog.REPORT_GRACE + 1 + 3


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_gil_holding_hang_with_output_nobody_reads(kind):
    """faulthandler's dump cannot be written either: a pipe is reopened non-blocking, so the dump is
    dropped and faulthandler exits; a socket cannot be, and the write-free SIGALRM ends it."""
    code, took, _ = _run_with_output_nobody_reads(
        "import os, re\n" + textwrap.dedent(SET_UP) + textwrap.dedent("""
        dog.begin("test")
        re.match(r"(a+)+$", "a" * 64 + "b")   # C code that holds the GIL
        """),
        kind, timeout=60,
    )
    if kind == "pipe":
        assert code == exitcodes.FORCED_GIL_HELD, f"exit code {code} after {took:.1f}s"
        assert took < 1.5 + watchdog.BACKSTOP_MARGIN + 3
    else:
        assert code == -signal.SIGALRM, f"exit code {code} after {took:.1f}s"
        assert took < 1.5 + watchdog.BACKSTOP_MARGIN + watchdog.ALARM_MARGIN + 3

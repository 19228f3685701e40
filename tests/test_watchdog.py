"""The exit watchdog in a real process: a hang in shutdown ends with code 3 and a stack dump; a hang
that holds the GIL ends through faulthandler."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from safe_scheduler import exitcodes, watchdog


def _run(body: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    script = textwrap.dedent(
        """
        import logging, sys, threading
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        from safe_scheduler.watchdog import ExitWatchdog
        dog = ExitWatchdog(shutdown_timeout=1.5)
        """
    ) + textwrap.dedent(body)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_blocked_shutdown_is_forced_with_stack_dump():
    done, took = _run(
        """
        def stuck_in_cleanup():
            threading.Event().wait()
        dog.arm("test")
        stuck_in_cleanup()
        """,
        timeout=30,
    )
    assert done.returncode == exitcodes.FORCED, done.stderr
    assert took < 1.5 + 5
    assert "stuck_in_cleanup" in done.stderr.split("Thread stacks at forced exit", 1)[1]


def test_sigterm_arms_the_deadline_while_the_main_thread_waits_in_a_db_driver(postgres):
    """SIGTERM's Python handler cannot run while libpq waits (it retries on EINTR): stock Airflow
    never notices the signal. The wakeup-fd listener does, and the deadline ends the process."""
    done, took = _run(
        f"""
        import os, signal, psycopg2
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))   # Airflow's: would exit 0
        dog.watch_signals()
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
        dog.arm("test")
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
        dog.watch_signals()

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
        from safe_scheduler.stall import StallWatchdog
        from safe_scheduler import exitcodes, metrics
        stall = StallWatchdog(1.0, on_stall=lambda why: dog.arm(why, forced_code=exitcodes.STALLED))
        metrics.gauge("seconds_since_heartbeat", 0)   # Airflow imported and Stats set up, as in a scheduler
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
    assert "no successful scheduler heartbeat" in done.stderr

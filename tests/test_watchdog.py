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

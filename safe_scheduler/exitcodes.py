"""Exit codes of ``airflow-safe-scheduler``.

Supervisors (supervisord, systemd, Kubernetes) decide what to do from the exit status alone, so each
outcome gets its own number and the numbers never change meaning. Which cause gets which code is
decided in one place, ``shutdown.exit_code`` (its module docstring has the table).
"""

#: The scheduler ended on its own terms: ``--num-runs`` reached, or SIGTERM/SIGINT handled in time.
OK = 0
#: The scheduler failed (an exception, e.g. the metadata database went away).
FAILED = 1
#: Refused to start: bad flag or setting, port taken, metadata database missing. Nothing was started.
USAGE = 2
#: Shutdown did not finish within ``shutdown_timeout``: the exit watchdog killed the process tree.
FORCED = 3
#: The scheduler stopped heartbeating for ``stall_timeout`` (hung, e.g. on a frozen database).
STALLED = 4
#: CPython's faulthandler ends a process whose shutdown hangs while holding the GIL with this code;
#: it cannot be changed, so it shares the number with FAILED. The stack dump on stderr tells them apart.
FORCED_GIL_HELD = 1

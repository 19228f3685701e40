"""The one shutdown: its owner (cause -> deadline -> exit code), the time plan it spends, the
GIL-free backstops, signals heard without taking them from Airflow, and the stop of running
tasks. Imports ``children`` and ``base``."""

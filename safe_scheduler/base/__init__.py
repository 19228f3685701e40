"""The foundation every layer may use, importing nothing of ours above it: the exit-code table,
the errors that refuse a start, Airflow's differences (``compat``), output that never blocks,
named threads, ``prctl`` and metrics."""

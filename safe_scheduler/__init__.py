"""airflow-safe-scheduler: an Airflow scheduler that can crash but never hang."""

__version__ = "0.1.0"

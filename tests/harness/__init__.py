"""What the tests and the bench share: real PostgreSQL and Redis servers they start themselves
(``pg``, ``broker``), processes watched by pid (``procs``), Airflow deployments (``deployment``),
the faults to inject and the checks after them (``faults``), the components' and CeleryExecutor's
set-ups (``components``, ``celery``), the chart (``chart``), supervisors' restarts (``restarts``),
and the stand-in services (``jobservice``, ``listener``, ``external_job``). No test module imports
another; the bench imports only this package.
"""

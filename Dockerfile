# The official Apache Airflow image with airflow-safe-scheduler installed; default command runs it.
#   docker build --build-arg AIRFLOW_VERSION=3.3.2 -t airflow-safe-scheduler:3.3.2 .
# The constraints file for AIRFLOW_VERSION and PYTHON_VERSION must exist in constraints/.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

# Stage 1: build our wheel (pure Python; nothing of the build tooling reaches the final image).
# Sources go under the airflow user's home: setuptools writes build files next to them.
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS build
COPY --chown=airflow:0 pyproject.toml README.md /home/airflow/safe-scheduler-src/
COPY --chown=airflow:0 safe_scheduler /home/airflow/safe-scheduler-src/safe_scheduler
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/airflow/safe-scheduler-dist \
      /home/airflow/safe-scheduler-src

# Stage 2: the official image, our wheel installed with the known-good constraints.
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG AIRFLOW_VERSION
ARG PYTHON_VERSION
COPY --from=build --chown=airflow:0 /home/airflow/safe-scheduler-dist /opt/airflow/safe-scheduler-dist
COPY --chown=airflow:0 constraints /opt/airflow/safe-scheduler-constraints
# Official-image practice: name apache-airflow with its version so pip never moves it.
RUN pip install --no-cache-dir \
      -c "/opt/airflow/safe-scheduler-constraints/airflow-${AIRFLOW_VERSION}-py${PYTHON_VERSION}.txt" \
      "apache-airflow==${AIRFLOW_VERSION}" \
      /opt/airflow/safe-scheduler-dist/airflow_safe_scheduler-*.whl
# No USER or ENTRYPOINT line: the image stays the official one's non-root `airflow` user (uid 50000)
# and keeps its entrypoint (dumb-init + /entrypoint), which runs this command.
CMD ["airflow-safe-scheduler"]

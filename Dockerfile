# The official Apache Airflow image with airflow-safe-scheduler installed; default command runs it.
#   docker build --build-arg AIRFLOW_VERSION=3.3.2 -t airflow-safe-scheduler:3.3.2 .
#   docker build --build-arg AIRFLOW_VERSION=3.3.2 --build-arg PYTHON_VERSION=3.11 ...
# PYTHON_VERSION empty (the default) means the official image's own default Python for that
# release, apache/airflow:<version> (3.12 for 3.3.2 and 2.11.2, 3.7 for 2.6.3; constraints/README.md).
# The constraints file for AIRFLOW_VERSION and the image's Python must exist in constraints/.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=""

# Stage 1: build our wheel (pure Python; nothing of the build tooling reaches the final image).
# Sources go under the airflow user's home: setuptools writes build files next to them.
FROM apache/airflow:${AIRFLOW_VERSION}${PYTHON_VERSION:+-python${PYTHON_VERSION}} AS build
COPY --chown=airflow:0 pyproject.toml README.md /home/airflow/safe-scheduler-src/
COPY --chown=airflow:0 safe_scheduler /home/airflow/safe-scheduler-src/safe_scheduler
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/airflow/safe-scheduler-dist \
      /home/airflow/safe-scheduler-src

# Stage 2: the official image, our wheel installed with the known-good constraints.
FROM apache/airflow:${AIRFLOW_VERSION}${PYTHON_VERSION:+-python${PYTHON_VERSION}}
ARG AIRFLOW_VERSION
COPY --from=build --chown=airflow:0 /home/airflow/safe-scheduler-dist /opt/airflow/safe-scheduler-dist
COPY --chown=airflow:0 constraints /opt/airflow/safe-scheduler-constraints
# Official-image practice: name apache-airflow with its version so pip never moves it. The
# constraints are the ones for the Python this image has.
RUN python_version="$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
 && pip install --no-cache-dir \
      -c "/opt/airflow/safe-scheduler-constraints/airflow-${AIRFLOW_VERSION}-py${python_version}.txt" \
      "apache-airflow==${AIRFLOW_VERSION}" \
      /opt/airflow/safe-scheduler-dist/airflow_safe_scheduler-*.whl
# No USER or ENTRYPOINT line: the image stays the official one's non-root `airflow` user (uid 50000)
# and keeps its entrypoint (dumb-init + /entrypoint), which runs this command.
CMD ["airflow-safe-scheduler"]

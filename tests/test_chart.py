"""The official Helm chart (1.18.0), rendered by a real helm with our overlay, checked by the
Kubernetes API schemas, and each switched container run here as its pod would run it.

No Kubernetes cluster is needed: helm renders offline (the chart and its PostgreSQL subchart are in
``helm/upstream/``, vendored), ``kubernetes-validate --strict`` checks every manifest, and the rendered
container's args, env and probe run against real processes and a real PostgreSQL server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import jsonschema
import pytest
import yaml

from harness.chart import (
    BIN, COMPONENTS, IMAGE, PLUGIN, REPO, SCHEMA, all_containers, container, overlay, probe_target, render, tool,
    workload,
)
from harness.components import heartbeating, prepare
from harness.deployment import health_port_variable, health_ports
from harness.faults import MARGIN
from harness.procs import SchedulerProcess, http_status, wait_for
from safe_scheduler import components
from safe_scheduler.children import parent as reaper
from safe_scheduler.shutdown import watchdog

@pytest.fixture(scope="module")
def helm_home(tmp_path_factory) -> dict[str, str]:
    """A helm of its own (no ~/.config/helm touched) with the safe-probes plugin installed."""
    home = tmp_path_factory.mktemp("helm")
    env = dict(os.environ, HELM_DATA_HOME=str(home / "data"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_CACHE_HOME=str(home / "cache"))
    env.pop("HELM_PLUGINS", None)
    done = subprocess.run([tool("helm"), "plugin", "install", str(PLUGIN)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return env


# -- the values file -------------------------------------------------------------------------------


def test_overlay_validates_against_the_official_chart_schema():
    jsonschema.validate(overlay(), json.loads(SCHEMA.read_text()))


def test_overlay_sets_no_image_and_the_image_airflow_version():
    """Every pod of a release applying the file as shipped can pull: the image is an explicit step."""
    values = overlay()
    assert "images" not in values
    dockerfile = (REPO / "Dockerfile").read_text()
    airflow = re.search(r"^ARG AIRFLOW_VERSION=(\S+)", dockerfile, flags=re.M).group(1)
    assert values["airflowVersion"] == values["defaultAirflowTag"] == airflow


def test_overlay_alone_renders_the_official_image(helm_home):
    docs = render(helm_home)
    images = {c["image"] for _, c in all_containers(docs)}
    assert f"apache/airflow:{overlay()['airflowVersion']}" in images
    assert not [i for i in images if "safe" in i], images


# -- the rendered pods -----------------------------------------------------------------------------


@pytest.mark.parametrize("post_renderer", [False, True], ids=["values-only", "post-rendered"])
@pytest.mark.parametrize("executor, kinds", [
    ("CeleryExecutor", {"scheduler": "Deployment", "triggerer": "StatefulSet", "dag-processor": "Deployment"}),
    ("LocalExecutor", {"scheduler": "StatefulSet", "triggerer": "StatefulSet", "dag-processor": "Deployment"}),
])
def test_rendered_pods_run_our_commands_with_cheap_probes(helm_home, executor, kinds, post_renderer):
    args = ["--set", f"images.airflow.repository={IMAGE}"]
    if executor != "CeleryExecutor":  # the chart's default
        args += ["--set", f"executor={executor}"]
    docs = render(helm_home, *args, post_renderer=post_renderer)
    version = overlay()["airflowVersion"]
    for name in COMPONENTS:
        pod = workload(docs, name)
        assert pod["kind"] == kinds[name]
        main = container(docs, name)
        assert main["args"] == ["bash", "-c", f"exec airflow-safe-{name}"]
        assert main["image"] == f"{IMAGE}:{version}"
        env = {e["name"]: e.get("value") for e in main["env"]}
        shutdown = _shutdown_timeout(env, name)
        assert float(env["AIRFLOW__SAFE_SCHEDULER__CHILD_STOP_TIMEOUT"]) <= shutdown
        grace = pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > shutdown + watchdog.BACKSTOP_MARGIN + watchdog.ALARM_MARGIN + reaper.KILL_WAIT
        probes = ["livenessProbe"] + (["startupProbe"] if name == "scheduler" else [])
        for key in probes:
            probe = main[key]
            assert ("httpGet" in probe) == post_renderer and ("exec" in probe) != post_renderer, probe
            assert probe_target(probe) == (health_ports()[name], "/health")
        assert "readinessProbe" not in main
    # Every Airflow container of the release runs the one image, and no probe anywhere starts the CLI.
    for doc, c in all_containers(docs):
        if c["image"].split(":")[0].endswith("airflow") or "airflow-safe" in c["image"]:
            assert c["image"] == f"{IMAGE}:{version}", (doc["metadata"]["name"], c["name"], c["image"])
        if doc["metadata"]["labels"].get("component") in COMPONENTS:
            for key in ("livenessProbe", "startupProbe", "readinessProbe"):
                command = " ".join(c.get(key, {}).get("exec", {}).get("command", []))
                assert "airflow" not in command and "python" not in command, (c["name"], key, command)


def _shutdown_timeout(env: dict, name: str) -> float:
    """The container's shutdown_timeout: its env's, else the component's own default."""
    from safe_scheduler.startup import settings

    default = settings.defaults(components.get(name))["shutdown_timeout"]
    return float(env.get("AIRFLOW__SAFE_SCHEDULER__SHUTDOWN_TIMEOUT") or default)


@pytest.mark.parametrize("post_renderer", [False, True], ids=["values-only", "post-rendered"])
def test_rendered_workers_run_the_safe_worker_and_its_drain_fits_the_grace(helm_home, post_renderer):
    """Under the chart's default CeleryExecutor: the worker runs our command, its probe asks our
    endpoint (no ``celery inspect ping``), and its whole stop (the drain, the tasks' cleanup, the
    backstops, our parent's last sweep) fits in the grace period the chart gives workers."""
    docs = render(helm_home, "--set", f"images.airflow.repository={IMAGE}", post_renderer=post_renderer)
    worker = container(docs, "worker")
    assert worker["args"] == ["bash", "-c", "exec airflow-safe-celery-worker"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    shutdown = _shutdown_timeout(env, "celery-worker")
    grace = workload(docs, "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= shutdown + watchdog.BACKSTOP_MARGIN + watchdog.ALARM_MARGIN + reaper.KILL_WAIT, (grace, shutdown)
    from safe_scheduler.startup import settings

    class PodConf:  # what the pod's env sets of [safe_scheduler], nothing else
        def get(self, section, key, fallback=None):
            return env.get(f"AIRFLOW__{section.upper()}__{key.upper()}", fallback)

    drained = settings.load({}, PodConf(), components.get("celery-worker"))
    assert drained.task_drain_timeout >= 300, drained  # most of the grace goes to letting tasks finish
    probe = worker["livenessProbe"]
    assert ("httpGet" in probe) == post_renderer
    assert probe_target(probe) == (health_ports()["celery-worker"], "/health")
    assert "inspect" not in json.dumps(probe)


# -- metrics ---------------------------------------------------------------------------------------

#: What our code emits, one of each shape (metrics.py and its callers), for each component.
METRICS = {
    "stalls": ("airflow_safe_stalls", {}),
    "seconds_since_heartbeat": ("airflow_safe_seconds_since_heartbeat", {}),
    "shutdown_duration": ("airflow_safe_shutdown_duration", {}),
    "children_killed": ("airflow_safe_children_killed", {}),
    "tasks_stopped": ("airflow_safe_tasks_stopped", {}),
    "tasks_killed": ("airflow_safe_tasks_killed", {}),
    "broker_unreachable": ("airflow_safe_broker_unreachable", {}),
    "recoveries": ("airflow_safe_recoveries", {}),
    "forced_exits.deadline": ("airflow_safe_forced_exits", {"kind": "deadline"}),
    "child_exited.serve_logs": ("airflow_safe_child_exited", {"child": "serve_logs"}),
    "child_restarted.health_check": ("airflow_safe_child_restarted", {"child": "health_check"}),
}


def _glob_match(mapping: dict, metric: str) -> list[str] | None:
    """statsd_exporter's glob mapping: ``*`` is one dot-separated part, captured as $1, $2, ..."""
    if mapping.get("match_type", "glob") != "glob":
        return None
    pattern = "^" + r"\.".join("([^.]+)" if part == "*" else re.escape(part)
                               for part in mapping["match"].split(".")) + "$"
    found = re.match(pattern, metric)
    return list(found.groups()) if found else None


def _expand(template: str, groups: list[str]) -> str:
    return re.sub(r"\$(\d+)", lambda m: groups[int(m.group(1)) - 1], template)


def test_statsd_mappings_give_prometheus_names_and_labels(helm_home):
    docs = render(helm_home, validate=False)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "mappings.yml" in d.get("data", {}))
    mappings = yaml.safe_load(config["data"]["mappings.yml"])["mappings"]
    ours = overlay()["statsd"]["extraMappings"]
    assert all(m in mappings for m in ours)  # rendered into the exporter's config
    for name in components.names():
        component = name.replace("-", "_")
        for metric, (prom, labels) in METRICS.items():
            full = f"airflow.safe_{component}.{metric}"  # Airflow's default [metrics] statsd_prefix
            matches = [(m, g) for m, g in ((m, _glob_match(m, full)) for m in mappings) if g is not None]
            assert matches, f"{full} is not mapped"
            mapping, groups = matches[0]  # the first match wins
            assert mapping in ours, (full, mapping)
            assert _expand(mapping["name"], groups) == prom
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", prom)
            got = {k: _expand(v, groups) for k, v in mapping.get("labels", {}).items()}
            assert got == {"component": component, **labels}, (full, got)



@pytest.mark.parametrize("post_renderer", [False, True], ids=["values-only", "post-rendered"])
def test_rendered_api_server_runs_the_safe_command_and_its_stop_fits_the_grace(helm_home, post_renderer):
    """The api-server runs our command; its probes start no CLI (the chart's httpGet), and with the
    post-renderer its liveness and startup probes ask our endpoint; the readiness probe stays the
    chart's; its whole stop fits in the pod's grace (Kubernetes' 30 s: the chart sets none)."""
    docs = render(helm_home, "--set", f"images.airflow.repository={IMAGE}", post_renderer=post_renderer)
    main = container(docs, "api-server")
    assert main["args"] == ["bash", "-c", "exec airflow-safe-api-server"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    shutdown = _shutdown_timeout(env, "api-server")
    grace = workload(docs, "api-server")["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace > shutdown + watchdog.BACKSTOP_MARGIN + watchdog.ALARM_MARGIN + reaper.KILL_WAIT, (grace, shutdown)
    ours = (health_ports()["api-server"], "/health")
    for key in ("livenessProbe", "startupProbe", "readinessProbe"):
        probe = main[key]
        assert "httpGet" in probe and "exec" not in probe, probe
        assert (probe_target(probe) == ours) == (post_renderer and key != "readinessProbe"), (key, probe)

# -- each component as its pod runs it -------------------------------------------------------------


def _http(port: int, path: str) -> int | None:
    return http_status(f"http://127.0.0.1:{port}{path}")


def _exec_probe(command: list[str], timeout: float) -> bool:
    """The kubelet's exec probe: success is exit code 0 within the probe's timeout."""
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_runs_as_its_pod_and_its_probe_follows_it(helm_home, deployment, postgres, name):
    """The rendered args and env, the rendered probe: passing while the job heartbeats, failing
    within the stall threshold once every DB process is frozen, and the process gone after that."""
    if not shutil.which("curl"):
        pytest.fail("curl is needed: the overlay's exec probe runs it (as the official image has it)")
    docs = render(helm_home, "--set", "executor=LocalExecutor", validate=False)
    main = container(docs, name)
    liveness = main["livenessProbe"]
    plain = {e["name"]: e["value"] for e in main["env"] if "value" in e}
    plain.pop("AIRFLOW_HOME")  # /opt/airflow in the image; here the test's own home
    env = dict(deployment.env, **plain, PATH=f"{BIN}:{os.environ['PATH']}")
    for component in health_ports():  # the pod's own ports: the defaults, as the probe expects them
        env.pop(health_port_variable(component))
    for key in ("AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK", "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC"):  # the other tests' settings, not the pod's
        env.pop(key)
    # What the secrets (valueFrom) give the pod is the test's: its database, its JWT secret (above).
    # Only for time: Airflow's own "unhealthy after" for this job, 5 s, so the stall timeout is 10 s.
    section, option = components.get(name).job.health_threshold
    env[f"AIRFLOW__{section.upper()}__{option.upper()}"] = "5"
    prepare(deployment, name)
    env.update({k: v for k, v in deployment.env.items() if k == "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR"})
    pod = SchedulerProcess(main["args"], env, deployment.home / f"pod-{name}.log", 0, reaped=True).start()
    deployment.started.append(pod)

    port, path = probe_target(liveness)
    timeout = liveness["timeoutSeconds"]
    # Its job's own heartbeat first: the endpoint is healthy from the start for a stall timeout, and a
    # freeze before the job's first connection ends it on that connection's timeout (exit 1), not as
    # a stall (seen once, on a machine loaded by the rest of the suite).
    wait_for(heartbeating(postgres, pod, name), 120, interval=0.5, message=f"a {name} heartbeat")
    wait_for(lambda: pod.popen.poll() is None and _exec_probe(liveness["exec"]["command"], timeout), 120,
             interval=0.5, message=f"the {name}'s rendered probe to pass")
    assert _http(port, path) == 200  # and as the post-rendered httpGet would ask
    if name == "scheduler":
        assert _exec_probe(main["startupProbe"]["exec"]["command"], timeout)

    postgres.freeze()
    frozen = time.monotonic()
    wait_for(lambda: not _exec_probe(liveness["exec"]["command"], timeout), 10 + MARGIN, interval=0.5,
             message="the probe to fail")
    failed_after = time.monotonic() - frozen
    assert failed_after < 10 + 3, f"the probe failed only {failed_after:.1f}s after the freeze"
    # The probe fails at the very age at which the watchdog acts: a thaw right then can let the
    # blocked heartbeat land first (seen in CI, 10.04 s after the last one). The fault is held until
    # the watchdog has certainly looked, then lifted so that the shutdown is not slowed by it.
    time.sleep(max(0.0, frozen + 10 + 5 - time.monotonic()))
    postgres.thaw()
    code = pod.wait_exit(30 + MARGIN)
    assert code == 4, pod.log()[-4000:]  # hung: no heartbeat for the stall timeout
    assert _http(port, path) is None
    assert not pod.survivors_after(5.0)

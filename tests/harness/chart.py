"""The official Helm chart rendered by a real helm, with or without our overlay, and the parts of
the rendered manifests the tests and the bench read (a component's workload, container, probe)."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "helm" / "values-safe-scheduler.yaml"
PLUGIN = REPO / "helm" / "safe-probes"
CHART = REPO / "helm" / "upstream" / "airflow-1.18.0"
SCHEMA = REPO / "helm" / "upstream" / "values.schema.json"
TOOLS = REPO / ".venv" / "tools" / "bin"
BIN = Path(sys.executable).parent
IMAGE = "registry.example.com/airflow-safe-scheduler"
COMPONENTS = ("scheduler", "triggerer", "dag-processor")
#: Kubernetes release the manifests are validated against (the chart supports 1.30 and newer).
KUBERNETES = "1.33.0"


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} is missing: run scripts/k8s-tools (scripts/bootstrap --with-postgres runs it)"
    return str(path)


def overlay() -> dict:
    return yaml.safe_load(OVERLAY.read_text())


def render(helm_home: dict[str, str], *args: str, overlay: bool = True, post_renderer: bool = False,
           validate: bool = True) -> list[dict]:
    """The chart rendered by helm (with our overlay, unless ``overlay`` is False), as documents."""
    cmd = [tool("helm"), "template", "airflow", str(CHART), *(["-f", str(OVERLAY)] if overlay else []), *args]
    if post_renderer:
        cmd += ["--post-renderer", "safe-probes"]
    done = subprocess.run(cmd, env=helm_home, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if validate:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as manifests:
            manifests.write(done.stdout)
            manifests.flush()
            checked = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES,
                                      manifests.name], capture_output=True, text=True, timeout=300)
        assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def workload(docs: list[dict], component: str) -> dict:
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
             and d["metadata"]["labels"].get("component") == component]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def container(docs: list[dict], component: str) -> dict:
    return next(c for c in workload(docs, component)["spec"]["template"]["spec"]["containers"] if c["name"] == component)


def probe_target(probe: dict) -> tuple[int, str]:
    """(port, path) the probe asks: httpGet, or the overlay's curl command."""
    if "httpGet" in probe:
        return int(probe["httpGet"]["port"]), probe["httpGet"]["path"]
    command = probe["exec"]["command"]
    assert command[0] == "curl", command
    url = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S*)", command[-1])
    return int(url.group(1)), url.group(2)


def all_containers(docs: list[dict]):
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec")
        if pod:
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                yield doc, c

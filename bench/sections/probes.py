"""Liveness probe cost: CPU per probe of the chart's own command (``airflow jobs check``, from the
real chart rendered by helm) against ours (the overlay's curl, and the kubelet's httpGet), against
the same live safe components. Needs ``scripts/k8s-tools`` (helm)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

from harness.chart import container, render
from harness.components import heartbeating, prepare
from harness.deployment import PYTHON, health_ports
from harness.procs import threads_of, wait_for
from lab import COMPONENTS, Lab, interleaved

#: The chart's liveness probe period for the three components (values.yaml: periodSeconds 60).
PROBES_PER_HOUR = 3600 / 60

#: Runs one probe and reports its wait4 usage. A process's peak RSS (``ru_maxrss``) keeps the size of
#: whatever it was before ``exec``, and a child of this process would report our own 120+ MB: so the
#: probe is forked from this small helper (``-S``: no site packages), whose size is the floor (~9 MB).
MEASURE = """
import json, os, sys
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1, 2):
        os.dup2(fd, n)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]))
"""


def chart_probe(overlay: bool) -> dict[str, list[str]]:
    """Each component's liveness probe command as the real chart renders it, stock or with our overlay.

    The chart's command runs the image's ``/entrypoint``, which with ``CONNECTION_CHECK_MAX_COUNT=0``
    only ``exec``s its arguments: here the arguments run directly.
    """
    version = [] if overlay else ["--set", "airflowVersion=3.3.2", "--set", "defaultAirflowTag=3.3.2"]
    docs = render(dict(os.environ), *version, overlay=overlay, validate=False)
    return {name: [part.replace("exec /entrypoint \\\n", "exec ") for part in
                   container(docs, name)["livenessProbe"]["exec"]["command"]] for name in COMPONENTS}


def _measured(cmd: list[str], env: dict) -> tuple[int, float, float]:
    """Exit code, CPU seconds (user + system) and peak RSS (MB) of one probe process."""
    done = subprocess.run([sys.executable, "-S", "-c", MEASURE, *cmd], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=True)
    code, cpu, rss = json.loads(done.stdout)
    return code, cpu, rss


def probe_cost(lab: Lab, component: str, cli_runs: int, curl_runs: int, http_runs: int) -> dict:
    """CPU per liveness probe against one live safe component: the chart's command, our overlay's
    curl (the probe process plus our endpoint's thread), and an httpGet as the kubelet sends it (our
    endpoint's thread only: the kubelet's side is outside the pod)."""
    stock_commands, our_commands = chart_probe(overlay=False), chart_probe(overlay=True)
    dep, server = lab.deployment()
    try:
        prepare(dep, component)
        proc = dep.component(component)
        wait_for(heartbeating(server, proc, component), 120, interval=0.5, message="a heartbeat")
        env = dict(dep.env, PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
        # Our endpoint on its own port here; the overlay's probe asks the default one.
        port = dep.endpoint_port(component)
        ours = [part.replace(f":{health_ports()[component]}/", f":{port}/") for part in our_commands[component]]
        cli = [_measured(stock_commands[component], env) for _ in range(cli_runs)]
        if any(code != 0 for code, _, _ in cli):
            raise RuntimeError(f"the chart's probe failed against a healthy {component}: {cli}")

        def server_cpu() -> float:
            return sum(cpu for name, cpu in threads_of(proc.job_pid).values() if name == "safe-health")

        before = server_cpu()
        curl = [_measured(ours, env) for _ in range(curl_runs)]
        if any(code != 0 for code, _, _ in curl):
            raise RuntimeError(f"our probe failed against a healthy {component}: {curl[:3]}")
        curl_server = (server_cpu() - before) / curl_runs
        before = server_cpu()
        for _ in range(http_runs):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                resp.read()
        http_server = (server_cpu() - before) / http_runs
        return {
            "cli_cpu_s": statistics.median(c for _, c, _ in cli), "cli_rss_mb": max(r for _, _, r in cli),
            "curl_cpu_s": statistics.median(c for _, c, _ in curl) + curl_server,
            "curl_rss_mb": max(r for _, _, r in curl), "http_cpu_s": http_server,
        }
    finally:
        dep.cleanup()
        server.destroy()


def measure(lab: Lab, args) -> dict:
    probes: dict = {}
    cli_runs, curl_runs = (3, 100) if args.quick else (10, 300)
    for component in COMPONENTS:
        probes[component] = interleaved(args.reps, lambda _: probe_cost(lab, component, cli_runs, curl_runs, 1000),
                                        f"probe cost, {component}", kinds=("safe",))["safe"]
    return probes


def table(probes: dict, args) -> list[str]:
    lines = ["", "## Liveness probe cost (medians; per probe and per hour for the three components at the "
             "chart's period, 60 s)", "",
             "The chart's probe is `airflow jobs check` as the chart renders it; ours is the overlay's curl "
             "(the probe process plus our endpoint's thread) and the kubelet's httpGet with the safe-probes "
             "post-renderer (our endpoint's thread only).", "",
             "| component | probe | CPU s per probe | peak RSS of the probe process (MB) | ratio to the chart's probe |",
             "| --- | --- | --- | --- | --- |"]
    hourly = {"cli": 0.0, "curl": 0.0, "http": 0.0}
    for component, runs in probes.items():
        row = {key: statistics.median(r[f"{key}_cpu_s"] for r in runs) for key in hourly}
        for key, label in (("cli", "chart's `airflow jobs check`"), ("curl", "ours, exec curl"), ("http", "ours, httpGet")):
            rss = f"{max(r[f'{key}_rss_mb'] for r in runs):.0f}" if key != "http" else "(no process)"
            lines.append(f"| {component} | {label} | {row[key]:.4g} | {rss} | {row[key] / row['cli']:.5f} |")
            hourly[key] += row[key] * PROBES_PER_HOUR
    lines += ["", f"Per hour, {', '.join(probes)}: the chart's probes {hourly['cli']:.1f} CPU-s "
              f"({hourly['cli'] / 36:.2f} % of a core); ours with curl {hourly['curl']:.3f} CPU-s "
              f"(ratio {hourly['curl'] / hourly['cli']:.5f}); ours with httpGet {hourly['http']:.4f} CPU-s "
              f"(ratio {hourly['http'] / hourly['cli']:.6f}). The scheduler's startup probe (every 10 s "
              "until it passes) comes on top, once per start."]
    return lines

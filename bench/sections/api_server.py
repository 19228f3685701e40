"""The api-server's cost (Airflow 3): requests a second and CPU per request through the core API,
the execution API and a route that asks the database, and idle CPU, stock ``airflow api-server``
against ``airflow-safe-api-server``, each with 2 uvicorn workers on a PostgreSQL of its own, in
interleaved pairs. CPU is the whole tree's (our parent included): what the safety costs is our
parent, each worker's beat (one datagram a second) and the job's look at the database (one
``SELECT 1`` a second), never a step in a request's path.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time

import psutil

from harness import pg
from harness.procs import http_status, wait_for
from lab import Lab, cpu, interleaved, ratios

ROUTES = {
    "core API (`/api/v2/version`)": "/api/v2/version",
    "execution API (`/execution/health`)": "/execution/health",
    "a database query (`/api/v2/monitor/health`)": "/api/v2/monitor/health",
}
#: Concurrent keep-alive clients per route: enough to keep 2 workers busy on 2 cores.
CLIENTS = 8
IDLE = "idle CPU of the whole tree (% of a core)"


def measure(lab: Lab, args) -> dict:
    from safe_scheduler.base import compat

    if compat.AIRFLOW_VERSION.major < 3:
        return {}
    window = 5.0 if args.quick else 10.0

    def one(kind: str) -> dict:
        dep, server = lab.deployment()
        try:
            port = pg.free_port()
            proc = dep.component("api-server", "--port", str(port), "--workers", "2", stock=kind == "stock")
            wait_for(lambda: http_status(f"http://127.0.0.1:{port}/api/v2/version") == 200, 180, interval=0.5,
                     message=f"the {kind} api-server to serve")
            time.sleep(3)  # a measurement's settling time: the workers' first requests warm their imports
            top = psutil.Process(proc.pid)
            tree = [top, *top.children(recursive=True)]
            out: dict = {}
            for label, path in ROUTES.items():
                before = cpu(tree)
                served = _load(port, path, window)
                out[label] = {"rps": served / window, "cpu_ms": 1000 * (cpu(tree) - before) / max(served, 1)}
            before = cpu(tree)
            time.sleep(window)
            out[IDLE] = 100 * (cpu(tree) - before) / window
            return out
        finally:
            dep.cleanup()
            server.destroy()

    return interleaved(args.reps, one, "api-server")


def _load(port: int, path: str, seconds: float) -> int:
    """Requests answered 200 within ``seconds``, from ``CLIENTS`` keep-alive connections."""
    counts = [0] * CLIENTS
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                counts[i] += response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def table(runs: dict, args) -> list[str]:
    if not runs:
        return ["", "## The api-server", "", "Not measured: Airflow 3 only."]
    pairs = list(zip(runs["stock"], runs["safe"]))
    lines = ["", "## The api-server: requests a second and CPU per request", "",
             f"2 uvicorn workers each, {CLIENTS} keep-alive clients per route on the same machine, "
             f"{len(pairs)} interleaved pairs. Per pair, safe / stock; above 1 is a cost for requests a second "
             "only below 1.", "",
             "| route | stock req/s (median) | safe req/s (median) | stock CPU ms/req | safe CPU ms/req |",
             "| --- | --- | --- | --- | --- |"]
    for label in ROUTES:
        lines.append(
            f"| {label} | {statistics.median(r[label]['rps'] for r in runs['stock']):.0f} "
            f"| {statistics.median(r[label]['rps'] for r in runs['safe']):.0f} "
            f"| {statistics.median(r[label]['cpu_ms'] for r in runs['stock']):.2f} "
            f"| {statistics.median(r[label]['cpu_ms'] for r in runs['safe']):.2f} |")
    lines.append("")
    for label in ROUTES:
        lines.append(ratios(f"{label}, requests a second", [s[label]["rps"] / t[label]["rps"] for t, s in pairs]))
        lines.append(ratios(f"{label}, CPU per request", [s[label]["cpu_ms"] / t[label]["cpu_ms"] for t, s in pairs]))
    lines.append(f"* {IDLE}: stock median {statistics.median(r[IDLE] for r in runs['stock']):.2f}, "
                 f"safe median {statistics.median(r[IDLE] for r in runs['safe']):.2f}")
    return lines

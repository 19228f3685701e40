"""The liveness endpoint under a flood: the safe scheduler's throughput and CPU per 1000 task
instances while a client sends its endpoint ``--flood-rate`` requests a second, against the same
without the flood, in pairs; and the endpoint thread's own CPU."""

from __future__ import annotations

import statistics
import subprocess
import sys

import psutil

from harness.deployment import Deployment
from harness.procs import threads_of
from lab import Lab
from sections.overhead import throughput

#: The flood: one connection per request, each read until its status line, at a fixed rate; a
#: separate process, so that it competes for the cores, not for the scheduler's GIL.
FLOOD = """
import socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
request = b"GET /health HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n"
start, sent, ok = time.monotonic(), 0, 0
while time.monotonic() - start < seconds:
    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    sent += 1
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(request)
            ok += sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        pass
print(sent / seconds, ok / max(sent, 1))
"""


def _endpoint_cpu(pid: int) -> float:
    return sum(seconds for name, seconds in threads_of(pid).values() if name == "safe-health")


def flooded(rate: float):
    """A ``throughput`` hook: the flood for the window; its rate, answered share and endpoint CPU."""

    def start(dep: Deployment, proc: psutil.Process, window: float):
        before = _endpoint_cpu(proc.pid)
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(dep.endpoint_port("scheduler")), str(rate),
                                  str(window)], stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

        def finish() -> dict:
            out, _ = flood.communicate(timeout=window + 60)
            if flood.returncode != 0:
                raise RuntimeError(f"the flood client failed (exit {flood.returncode})")
            achieved, answered = (float(x) for x in out.split())
            return {"flood_rate": achieved, "flood_answered_200": answered,
                    "endpoint_cpu_pct_core": (_endpoint_cpu(proc.pid) - before) * 100 / window}

        return finish

    return start


def measure(lab: Lab, args) -> dict:
    dags, tasks, warmup, window = (10, 5, 5, 20) if args.quick else (50, 20, 15, 60)
    runs: dict[str, list] = {"quiet": [], "flood": []}
    for rep in range(args.reps):
        for kind in ("quiet", "flood"):  # interleaved, so drift hits both alike
            hook = flooded(args.flood_rate) if kind == "flood" else None
            result = throughput(lab, False, dags, tasks, warmup, window, during=hook)
            runs[kind].append(result)
            print(f"endpoint flood [{kind} {rep + 1}/{args.reps}]: {result}", flush=True)
    return runs


def table(runs: dict, args) -> list[str]:
    pairs = list(zip(runs["quiet"], runs["flood"]))
    lines = ["", f"## The liveness endpoint under a flood ({args.flood_rate:g} requests a second, one connection "
             "each; the safe scheduler, with and without, in pairs; ratio = flood / quiet)", "",
             "| measure | quiet (median) | flood (median) | ratio of medians | per-pair ratios |",
             "| --- | --- | --- | --- | --- |"]
    for key, label in (("tis_per_s", "throughput (TIs/s)"), ("cpu_s_per_1000", "scheduler CPU per 1000 TIs (s)")):
        quiet = statistics.median(r[key] for r in runs["quiet"])
        flood = statistics.median(r[key] for r in runs["flood"])
        ratios = sorted(b[key] / a[key] for a, b in pairs)
        lines.append(f"| {label} | {quiet:.4g} | {flood:.4g} | {flood / quiet:.3f} | "
                     f"{', '.join(f'{r:.3f}' for r in ratios)} |")
    flood = runs["flood"]
    lines += ["", f"Flood achieved {statistics.median(r['flood_rate'] for r in flood):.0f} requests/s, "
              f"{min(r['flood_answered_200'] for r in flood):.3f} of them answered 200 (worst run); the endpoint "
              f"thread used {statistics.median(r['endpoint_cpu_pct_core'] for r in flood):.2f} % of a core "
              "(median, read per thread from /proc)."]
    return lines

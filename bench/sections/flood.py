"""The liveness endpoint under a flood: the safe scheduler's throughput and CPU per 1000 task
instances while a client sends its endpoint ``--flood-rate`` requests a second, in triples:

* quiet: no flood;
* control: the same flood, at the same endpoint code run in a process of its own, so that the
  client's and the kernel's share of the two cores is the same as under the flood;
* flood: the flood at the scheduler's own endpoint.

flood / control is what the endpoint costs the scheduler; control / quiet what the flood costs
the machine. The endpoint thread's own CPU is read per thread from /proc."""

from __future__ import annotations

import statistics
import subprocess
import sys

import psutil

from harness.deployment import Deployment
from harness.procs import threads_of
from lab import Lab, interleaved
from sections.overhead import throughput

#: The flood: one connection per request, each read until its status line, opened on a fixed
#: schedule whether or not the earlier ones were answered (many in flight, as independent clients
#: would be: a client that waits for each answer would be paced by the endpoint's batching); each
#: gets 2 s. A separate process, so that it competes for the cores, not for the scheduler's GIL.
FLOOD = """
import selectors, socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
request = b"GET /health HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n"
selector = selectors.DefaultSelector()
opened = {}
start, sent, ok = time.monotonic(), 0, 0

def close(sock):
    selector.unregister(sock)
    opened.pop(sock, None)
    sock.close()

while True:
    now = time.monotonic()
    if (now - start >= seconds and not opened) or now - start >= seconds + 3:
        break
    while now - start < seconds and sent < (now - start) * rate:
        sent += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE)
        opened[sock] = now
    for key, events in selector.select(max(0.0, min(0.01, start + sent / rate - time.monotonic()))):
        sock = key.fileobj
        try:
            if events & selectors.EVENT_WRITE:
                sock.send(request)
                selector.modify(sock, selectors.EVENT_READ)
                continue
            ok += sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            pass
        close(sock)
    for sock in [s for s, at in opened.items() if time.monotonic() - at > 2.0]:
        close(sock)
for sock in list(opened):
    close(sock)
print(sent / seconds, ok / max(sent, 1))
"""


def _endpoint_cpu(pid: int) -> float:
    return sum(seconds for name, seconds in threads_of(pid).values() if name == "safe-health")


#: The control's endpoint: the same server, healthy, in a process of its own; prints its port.
CONTROL = """
import sys, threading
from safe_scheduler.liveness import healthserver
server = healthserver.start("127.0.0.1", 0, healthserver.Health(lambda: 1.0, lambda: False, 60.0))
print(server.server_address[1], flush=True)
threading.Event().wait()
"""


def flooded(rate: float, control: bool):
    """A ``throughput`` hook: the flood for the window, at the scheduler's endpoint or the control's;
    its rate, answered share and the scheduler's endpoint thread's CPU."""

    def start(dep: Deployment, proc: psutil.Process, window: float):
        before = _endpoint_cpu(proc.pid)
        target = subprocess.Popen([sys.executable, "-c", CONTROL], stdout=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL) if control else None
        port = int(target.stdout.readline()) if target else dep.endpoint_port("scheduler")
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(rate), str(window)],
                                 stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

        def finish() -> dict:
            try:
                out, _ = flood.communicate(timeout=window + 60)
            finally:
                if target:
                    target.kill()
                    target.wait(10)
            if flood.returncode != 0:
                raise RuntimeError(f"the flood client failed (exit {flood.returncode})")
            achieved, answered = (float(x) for x in out.split())
            return {"flood_rate": achieved, "flood_answered_200": answered,
                    "endpoint_cpu_pct_core": (_endpoint_cpu(proc.pid) - before) * 100 / window}

        return finish

    return start


def measure(lab: Lab, args) -> dict:
    dags, tasks, warmup, window = (10, 5, 5, 20) if args.quick else (50, 20, 15, 60)

    def run(kind: str) -> dict:
        hook = None if kind == "quiet" else flooded(args.flood_rate, control=kind == "control")
        return throughput(lab, False, dags, tasks, warmup, window, during=hook)

    return interleaved(args.reps, run, "endpoint flood", kinds=("quiet", "control", "flood"))


def table(runs: dict, args) -> list[str]:
    lines = ["", f"## The liveness endpoint under a flood ({args.flood_rate:g} requests a second, one connection "
             "each; the safe scheduler; medians, and the ratios per triple)", "",
             "Control: the same flood at the same endpoint code in a process of its own (the client's and the "
             "kernel's share of the cores as under the flood). flood / control is what the endpoint costs the "
             "scheduler; control / quiet what the flood costs the machine.", "",
             "| measure | quiet | control | flood | flood / control, per triple | control / quiet, per triple |",
             "| --- | --- | --- | --- | --- | --- |"]
    triples = list(zip(runs["quiet"], runs["control"], runs["flood"]))
    for key, label in (("tis_per_s", "throughput (TIs/s)"), ("cpu_s_per_1000", "scheduler CPU per 1000 TIs (s)")):
        medians = [statistics.median(r[key] for r in runs[kind]) for kind in ("quiet", "control", "flood")]
        ours = sorted(f[key] / c[key] for _, c, f in triples)
        machine = sorted(c[key] / q[key] for q, c, _ in triples)
        lines.append(f"| {label} | {medians[0]:.4g} | {medians[1]:.4g} | {medians[2]:.4g} | "
                     f"median {statistics.median(ours):.3f} ({', '.join(f'{r:.3f}' for r in ours)}) | "
                     f"median {statistics.median(machine):.3f} ({', '.join(f'{r:.3f}' for r in machine)}) |")
    flood = runs["flood"]
    lines += ["", f"Flood achieved {statistics.median(r['flood_rate'] for r in flood):.0f} requests/s, "
              f"{min(r['flood_answered_200'] for r in flood):.3f} of them answered 200 (worst run); the "
              f"scheduler's endpoint thread used {statistics.median(r['endpoint_cpu_pct_core'] for r in flood):.2f} % "
              "of a core (median, read per thread from /proc)."]
    return lines

"""Outages under a supervisor's restarts: seconds from the database's return to each component's
first heartbeat (its job's start), stock vs safe, each component restarted as the kubelet,
supervisord or systemd would (``tests/harness/restarts.py``), for outages of 20 s, 2 and 10 min."""

from __future__ import annotations

import statistics
import time

from harness.components import heartbeating, prepare, started_after
from harness.procs import wait_for
from harness.restarts import POLICIES, Kubelet, Restarted
from lab import Lab, interleaved, safe_args

#: Seconds after the return by which every component must have started: the kubelet's longest
#: back-off, one crash, and the start itself.
RECOVERY_LIMIT = Kubelet.MAX + 60


def outage(lab: Lab, policy: str, seconds: float, components: list[str]) -> dict:
    """Stock and safe side by side, each on its own PostgreSQL server, both stopped and started
    again at the same moments; per component, seconds from the return to its first heartbeat and
    how many times it was restarted."""
    deployments = {kind: lab.deployment() for kind in ("stock", "safe")}
    restarted: dict[tuple[str, str], Restarted] = {}
    try:
        for kind, (dep, server) in deployments.items():
            for name in components:
                prepare(dep, name)

                def start(dep=dep, name=name, stock=kind == "stock"):
                    return dep.component(name, *safe_args(stock), stock=stock)

                restarted[(kind, name)] = Restarted(start, POLICIES[policy]())
        for (kind, name), runs in restarted.items():
            server = deployments[kind][1]
            wait_for(lambda: heartbeating(server, runs.current, name)(), 180, interval=0.5,
                     message=f"{kind} {name} to heartbeat")
        for _, server in deployments.values():
            server.stop("immediate")
        time.sleep(seconds)  # the outage
        back = {}
        for kind, (_, server) in deployments.items():
            server.start()
            back[kind] = time.time()
        found: dict[tuple[str, str], float | None] = {key: None for key in restarted}
        deadline = time.monotonic() + RECOVERY_LIMIT
        while None in found.values() and time.monotonic() < deadline:
            for kind, name in [key for key, value in found.items() if value is None]:
                at = started_after(deployments[kind][1], name, back[kind])
                found[(kind, name)] = None if at is None else at - back[kind]
            time.sleep(0.2)
        return {f"{kind} {name}": {"after_return_s": found[(kind, name)],
                                   "restarts": len(restarted[(kind, name)].runs) - 1}
                for kind, name in restarted}
    finally:
        for runs in restarted.values():
            runs.stop()
        for dep, server in deployments.values():
            dep.cleanup()
            server.destroy()


def measure(lab: Lab, args) -> dict:
    results: dict = {}
    for policy in args.restart_policies:
        # The kubelet runs all three components; supervisord and systemd, as the examples, the scheduler.
        components = list(args.components) if policy == "kubelet" else ["scheduler"]
        for seconds in args.outages:
            results[f"{policy}, {seconds:g} s outage"] = interleaved(
                args.reps, lambda _: outage(lab, policy, seconds, components), f"outage, {policy}, {seconds:g} s",
                kinds=("stock and safe",))["stock and safe"]
    return results


def table(results: dict, args) -> list[str]:
    lines = ["", "## Outages under a supervisor's restarts (seconds from the database's return to the "
             "component's first heartbeat, its job's start; median of the repetitions, and restarts)", "",
             "Stock and safe side by side, each on its own PostgreSQL server, stopped (`-m immediate`) and "
             "started again at the same moments. The kubelet: 10 s doubling to 300 s, reset after 10 "
             "minutes; supervisord: `examples/supervisord.conf` (startsecs 10); systemd: the shipped unit "
             "(RestartSec 5, the default start limit).", "",
             "| restarts by, outage | component | stock: after return (s) | stock restarts | "
             "safe: after return (s) | safe restarts |", "| --- | --- | --- | --- | --- | --- |"]

    def median(values: list) -> str:
        done = [v for v in values if v is not None]
        return f"{statistics.median(done):.1f}" if len(done) == len(values) else f"never (> {RECOVERY_LIMIT:g})"

    for scenario, runs in results.items():
        names = sorted({key.split(" ", 1)[1] for key in runs[0]})
        for name in names:
            row = [scenario, name]
            for kind in ("stock", "safe"):
                row.append(median([r[f"{kind} {name}"]["after_return_s"] for r in runs]))
                row.append(", ".join(str(r[f"{kind} {name}"]["restarts"]) for r in runs))
            lines.append("| " + " | ".join(row) + " |")
    return lines

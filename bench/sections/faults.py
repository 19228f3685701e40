"""Fault to exit: seconds until the process and every process it forked are gone, stock vs safe."""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

from harness.components import heartbeating, prepare
from harness.faults import HANGING_SHUTDOWN_PLUGIN, LEAKY_THREAD_PLUGIN
from harness.procs import wait_for
from lab import Lab, fmt, gone, interleaved, safe_args

# name -> (plugin to install, how to inject the fault)
SCENARIOS = {
    "DB stopped": (None, "stop"),
    "DB stopped + non-daemon thread": (LEAKY_THREAD_PLUGIN, "stop"),
    "SIGTERM": (None, "sigterm"),
    "SIGTERM + blocked exit": (HANGING_SHUTDOWN_PLUGIN, "sigterm"),
    "DB frozen (SIGSTOP)": (None, "freeze"),
    "SIGKILL": (None, "sigkill"),
    # The OOM killer's pick: the job process (for stock, the same process as above).
    "SIGKILL of the job process": (None, "sigkill-job"),
}


def fault_to_exit(lab: Lab, name: str, stock: bool, limit: float, component: str = "scheduler") -> dict:
    plugin, fault = SCENARIOS[name]
    dep, server = lab.deployment()
    try:
        if plugin:  # a listener's thread, atexit handler or hang: it fires for every job type
            dep.add_plugin("bench_plugin", plugin)
        if component == "scheduler":
            proc = dep.scheduler(*safe_args(stock), stock=stock)
            proc.wait_healthy()
            wait_for(lambda: len(proc.descendants_named("worker")) >= 4, 60, message="workers")
        else:
            prepare(dep, component)
            proc = dep.component(component, *safe_args(stock), stock=stock)
            wait_for(heartbeating(server, proc, component), 120, interval=0.5, message="a heartbeat")
        started = time.monotonic()
        {"stop": lambda: server.stop("immediate"), "freeze": server.freeze,
         "sigterm": lambda: proc.signal(signal.SIGTERM),
         "sigkill": lambda: proc.signal(signal.SIGKILL),
         "sigkill-job": lambda: os.kill(proc.job_pid, signal.SIGKILL)}[fault]()
        code, seconds = gone(proc, started, limit)
        orphans = len(proc.survivors()) if code is not None else None
        return {"seconds": seconds, "code": code, "orphans": orphans}
    finally:
        dep.cleanup()
        server.destroy()


def measure(lab: Lab, args) -> dict:
    faults: dict = {}
    for component in args.components:
        for scenario in args.scenarios or SCENARIOS:
            name = scenario if component == "scheduler" else f"{component}: {scenario}"
            faults[name] = interleaved(
                args.reps, lambda kind: fault_to_exit(lab, scenario, kind == "stock", args.limit, component), name)
    return faults


def table(faults: dict, args) -> list[str]:
    lines = [
        "",
        "## Fault to exit (seconds until the process and every process it forked are gone)",
        "",
        "Rows without a prefix are the scheduler; `triggerer:` and `dag-processor:` rows compare stock "
        "`airflow triggerer` / `airflow dag-processor` with `airflow-safe-triggerer` / "
        "`airflow-safe-dag-processor` (same flags).",
        "",
        "| scenario | stock median | stock max | stock exit codes | stock orphans | safe median | safe max | "
        "safe exit codes | safe orphans |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in faults.items():
        row = [name]
        for kind in ("stock", "safe"):
            secs = [r["seconds"] for r in runs[kind]]
            done = [s for s in secs if s is not None]
            median = statistics.median(done) if len(done) == len(secs) else None
            worst = max(done) if len(done) == len(secs) else None
            codes = sorted({str(r["code"]) for r in runs[kind]})
            orphans = [r["orphans"] for r in runs[kind]]
            row += [fmt(median, args.limit), fmt(worst, args.limit), ", ".join(codes),
                    "still running" if None in orphans else str(max(orphans))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def chart(faults: dict, limit: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(faults)
    fig, ax = plt.subplots(figsize=(max(9, 0.75 * len(names)), 4.8), dpi=80)
    for offset, kind, color in ((-0.2, "stock", "#c0504d"), (0.2, "safe", "#4f81bd")):
        for i, name in enumerate(names):
            secs = [r["seconds"] for r in faults[name][kind]]
            never = any(s is None for s in secs)
            value = limit if never else statistics.median(secs)
            ax.bar(i + offset, value, width=0.38, color=color, hatch="//" if never else None,
                   label=kind if i == 0 else None)
            ax.text(i + offset, value, "never" if never else f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ").replace(": ", ":\n") for n in names], fontsize=7)
    ax.set_ylabel("seconds from fault to process tree gone (median)")
    ax.set_title(f"Fault to exit: stock vs safe (hatched: still alive at {limit:g} s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latest.png")

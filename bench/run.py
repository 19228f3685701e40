"""Benchmark: how fast a broken scheduler (triggerer, dag-processor) gets out of the way, and what the
safety costs a healthy one — stock ``airflow scheduler`` and ``airflow-safe-scheduler`` (and the
triggerer's and dag-processor's pairs, for fault to exit) side by side, in the same run,
against real PostgreSQL servers. Reports medians, maxima and safe/stock ratios, never a single
absolute time (this machine is noisy). Writes ``bench/results/latest.md`` and ``latest.png``.

    scripts/bench                 # full: 5 repetitions, 50 DAGs x 20 tasks
    scripts/bench --quick         # 1 repetition, small load: proves it works

Each section is a module of ``bench/sections`` (faults, kills, tasks, probes, celery, overhead,
flood, outages, heal, api_server, memory);
``bench/lab.py`` holds what they share. The liveness-probe rows need ``scripts/k8s-tools`` (helm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lab import COMPONENTS, REPO, SAFE_ARGS, Lab
from sections import api_server, celery, faults, flood, heal, kills, memory, outages, overhead, probes, tasks, worker


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, small load, short windows")
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default 5, quick 1)")
    parser.add_argument("--limit", type=float, help="seconds after which a process counts as never gone (60, quick 45)")
    parser.add_argument("--scenarios", nargs="*", choices=list(faults.SCENARIOS), help="default: all")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead measures")
    parser.add_argument("--no-faults", action="store_true", help="skip the fault-to-exit scenarios")
    parser.add_argument("--components", nargs="*", choices=COMPONENTS, default=list(COMPONENTS),
                        help="whose fault to exit and kills to measure (default: all three)")
    parser.add_argument("--tasks", type=int, nargs="*", default=None,
                        help="stop with N tasks running, for each N (default 1 16; quick: 1; none: skip)")
    parser.add_argument("--no-probes", action="store_true", help="skip the liveness probe cost")
    parser.add_argument("--no-celery", action="store_true", help="skip the CeleryExecutor run")
    parser.add_argument("--no-worker", action="store_true",
                        help="skip the Celery worker's own run (stock vs safe worker: throughput, probe, faults)")
    parser.add_argument("--worker-overhead-only", action="store_true",
                        help="the Celery worker's throughput and CPU pairs (the drains) alone: no probe, silence or stops")
    parser.add_argument("--worker-backlog", type=int, default=400,
                        help="task instances queued for the Celery worker to drain, per run (default 400, quick 64)")
    parser.add_argument("--no-flood", action="store_true", help="skip the liveness endpoint under a flood")
    parser.add_argument("--flood-rate", type=float, default=500.0,
                        help="requests a second at the liveness endpoint in the flood section (default 500)")
    parser.add_argument("--start-methods", nargs="*", choices=kills.START_METHODS, default=list(kills.START_METHODS),
                        help="kill -9 of each component under these start methods (default: all; none: skip)")
    parser.add_argument("--outages", type=float, nargs="*", default=None,
                        help="database outages under restarts, seconds each (default 20 120 600; quick: 20; none: skip)")
    parser.add_argument("--restart-policies", nargs="*", choices=["kubelet", "supervisord", "systemd"],
                        default=["kubelet", "supervisord", "systemd"], help="who restarts the components in the outages")
    parser.add_argument("--heal", nargs="*", choices=list(heal.FAULTS), default=list(heal.FAULTS),
                        help="heal time after each of these faults, stock vs safe (default: all; none: skip)")
    parser.add_argument("--heal-limit", type=float, default=420.0,
                        help="seconds after a fault until which heal is awaited (default 420)")
    parser.add_argument("--no-api-server", action="store_true",
                        help="skip the api-server's requests a second and CPU per request (Airflow 3)")
    parser.add_argument("--memory", nargs="*", choices=memory.COMPONENTS, default=None,
                        help="idle PSS, USS and RSS of these components' whole trees, stock and safe side by side "
                             "(default: all; quick: the scheduler; none: skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    args.limit = args.limit or (45.0 if args.quick else 60.0)
    args.idle_window = 20.0 if args.quick else 60.0
    args.kill_wait = 10.0 if args.quick else 30.0
    args.tasks = args.tasks if args.tasks is not None else ([1] if args.quick else [1, 16])
    if args.memory is None:
        args.memory = ["scheduler"] if args.quick else list(memory.COMPONENTS)
    args.outages = args.outages if args.outages is not None else ([20.0] if args.quick else [20.0, 120.0, 600.0])
    return args


def sections(args: argparse.Namespace) -> dict:
    """The sections this run measures, by the key of their results in ``latest.json``, in order."""
    wanted = {
        "faults": (faults, not args.no_faults and args.components),
        "kill_by_start_method": (kills, args.components and args.start_methods),
        "stop_with_tasks": (tasks, args.tasks),
        "probes": (probes, not args.no_probes),
        "celery": (celery, not args.no_celery),
        "worker": (worker, not args.no_worker),
        "overhead": (overhead, not args.no_overhead),
        "memory": (memory, args.memory),
        "endpoint_flood": (flood, not args.no_flood),
        "outages": (outages, args.outages and args.restart_policies),
        "heal": (heal, args.heal),
        "api_server": (api_server, not args.no_api_server),
    }
    return {key: module for key, (module, on) in wanted.items() if on}


def report(results: dict, args: argparse.Namespace) -> str:
    import airflow

    lines = [
        "# Benchmark: stock Airflow vs `airflow-safe-scheduler`"
        + ("" if set(args.components) == {"scheduler"} else " (and its triggerer and dag-processor)"),
        "",
        f"Airflow {airflow.__version__}, {os.cpu_count()} cores, {args.reps} repetition(s), "
        f"limit {args.limit:g} s. Safe scheduler flags: `{' '.join(SAFE_ARGS)}`. Command: "
        f"`{' '.join(['scripts/bench', *sys.argv[1:]])}`.",
    ]
    for key, module in sections(args).items():
        lines += module.table(results[key], args)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="safe-scheduler-bench-", dir="/tmp"))
    root.chmod(0o755)
    try:
        lab = Lab(root)
        results = {key: module.measure(lab, args) for key, module in sections(args).items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = report(results, args)
    print(text)
    (args.out / "latest.md").write_text(text)
    stored = dict(results, kill_by_start_method=kills.to_json(results.get("kill_by_start_method", {})))
    (args.out / "latest.json").write_text(json.dumps(stored, indent=1, default=str))
    if results.get("faults"):
        faults.chart(results["faults"], args.limit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

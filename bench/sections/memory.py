"""Memory as the kernel counts it: each component's whole tree idle, stock and safe side by side on
one PostgreSQL, by PSS (each shared page split between the processes that map it), with USS (the
pages only that tree's processes map) and RSS (shared pages counted once per process) beside it.

RSS overstates what a tree of forked Python processes costs, and understates what a freshly
started interpreter costs: the two trees differ in how their children start (forked copies share
with the process they came from), so only PSS sums to what the machine gives them. Stock and safe
run at once, in the same settle window, so that the page cache and the machine's load are the
same for both.
"""

from __future__ import annotations

import statistics
import time

import psutil

from harness import components, pg
from harness.broker import RedisServer
from harness.deployment import Deployment, tasks_need_api_server_and_dag_processor
from lab import Lab, safe_args

#: Seconds both trees run before they are read: start-up done, the first loops run, the pools up.
SETTLE = 40.0
#: Every component, each with its defaults (the api-server: Airflow 3 only).
COMPONENTS = ("scheduler", "triggerer", "dag-processor", "celery-worker", "api-server")


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def counts(procs: list[psutil.Process]) -> dict[str, float]:
    """PSS, USS and RSS summed over ``procs``, in MB (a process gone meanwhile counts nothing)."""
    total = {"pss": 0.0, "uss": 0.0, "rss": 0.0}
    for proc in procs:
        try:
            full = proc.memory_full_info()
        except psutil.Error:
            continue
        for key in total:
            total[key] += getattr(full, key) / 2**20
    return total


def _start(dep: Deployment, name: str, stock: bool):
    if name == "scheduler":
        return dep.scheduler(*safe_args(stock), stock=stock)
    if name == "celery-worker":
        return dep.worker(stock=stock, concurrency=16)  # Airflow's default worker_concurrency
    if name == "api-server":
        return dep.component(name, "--port", str(pg.free_port()), stock=stock)
    components.prepare(dep, name)  # on 2.x the dag-processor runs only standalone, with a DAG to parse
    return dep.component(name, *safe_args(stock), stock=stock)


def _started(lab: Lab, name: str):
    """The stock and the safe ``name``, each in a home of its own (its own ports), on one database
    (and for the worker one Redis)."""
    dep, server = lab.deployment()
    beside = Deployment(dep.home.parent / "beside", server.url)
    deps = {"stock": dep, "safe": beside}
    for each in deps.values():
        each.env.pop("AIRFLOW__CORE__PARALLELISM")  # the harness's 4: here Airflow's default (32)
    redis = None
    if name == "celery-worker":
        redis = RedisServer(dep.home.parent / "redis").start()
        for each in deps.values():
            each.use_celery(redis)
    procs = {kind: _start(deps[kind], name, kind == "stock") for kind in ("stock", "safe")}
    return procs, deps, server, redis


def _stop(deps: dict, server, redis) -> None:
    for dep in deps.values():
        dep.cleanup()
    if redis is not None:
        redis.stop()
    server.destroy()


def pair(lab: Lab, name: str, settle: float) -> dict[str, dict[str, float]]:
    """One idle pair: the stock and the safe tree of ``name``, started together on one database."""
    procs, deps, server, redis = _started(lab, name)
    try:
        time.sleep(settle)  # the settle window itself, not an assertion
        for kind, proc in procs.items():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{kind} {name} exited with {proc.popen.returncode}; see {proc.log_path}")
        got = {kind: counts(tree(proc.pid)) for kind, proc in procs.items()}
        for kind, proc in procs.items():
            print(f"memory [{name} {kind}], by process:\n  " + "\n  ".join(breakdown(proc.pid)), flush=True)
        safe = procs["safe"]
        got["parent"] = counts([psutil.Process(safe.pid)])
        got["safe"]["processes"] = len(tree(safe.pid))
        got["stock"]["processes"] = len(tree(procs["stock"].pid))
        return got
    finally:
        _stop(deps, server, redis)


def _settle(args) -> float:
    return 20.0 if args.quick else SETTLE


def measure(lab: Lab, args) -> dict:
    settle = _settle(args)
    runs: dict[str, list] = {}
    for name in args.memory:
        if name == "api-server" and not tasks_need_api_server_and_dag_processor():
            print("memory: no api-server before Airflow 3", flush=True)
            continue
        for rep in range(args.reps):
            got = pair(lab, name, settle)
            runs.setdefault(name, []).append(got)
            print(f"memory [{name} {rep + 1}/{args.reps}]: "
                  + ", ".join(f"{kind} PSS {v['pss']:.1f} USS {v['uss']:.1f} RSS {v['rss']:.1f}"
                              for kind, v in got.items()), flush=True)
    return runs


def _ratio_line(samples: list[dict], key: str) -> str:
    values = sorted(s["safe"][key] / s["stock"][key] for s in samples)
    return (f"{statistics.median(values):.3f} ({values[0]:.3f} … {values[-1]:.3f})" if values else "—")


def table(runs: dict, args) -> list[str]:
    lines = [
        "",
        "## Memory, idle, the whole tree (PSS, USS, RSS)",
        "",
        f"Stock and safe started together on one PostgreSQL, read after {_settle(args):g} s; "
        "the safe tree includes the parent. Ratios: median over the pairs (lowest … highest pair). "
        "MB: medians.",
        "",
        "| component | pairs | stock PSS | safe PSS | parent PSS | PSS safe/stock | USS safe/stock "
        "| RSS safe/stock | processes stock / safe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, samples in runs.items():
        med = {kind: statistics.median(s[kind]["pss"] for s in samples) for kind in ("stock", "safe", "parent")}
        procs = (statistics.median(s["stock"]["processes"] for s in samples),
                 statistics.median(s["safe"]["processes"] for s in samples))
        lines.append(
            f"| {name} | {len(samples)} | {med['stock']:.1f} | {med['safe']:.1f} | {med['parent']:.1f} "
            f"| {_ratio_line(samples, 'pss')} | {_ratio_line(samples, 'uss')} | {_ratio_line(samples, 'rss')} "
            f"| {procs[0]:g} / {procs[1]:g} |"
        )
    return lines


def breakdown(pid: int) -> list[str]:
    """Per process of a tree: PSS, USS, RSS and the first words of its command (the run's log)."""
    lines = []
    for proc in tree(pid):
        try:
            full, words = proc.memory_full_info(), " ".join(proc.cmdline()[:4])[:90]
        except psutil.Error:
            continue
        lines.append(f"{proc.pid:>7} PSS {full.pss / 2**20:6.1f} USS {full.uss / 2**20:6.1f} "
                     f"RSS {full.rss / 2**20:6.1f}  {words}")
    return lines


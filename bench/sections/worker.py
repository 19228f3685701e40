"""The Celery worker itself, stock ``airflow celery worker`` against ``airflow-safe-celery-worker``,
each fed by the same safe scheduler through a real Redis: throughput and the worker's CPU per 1000
task instances, the liveness probe's cost (the chart's ``celery inspect ping`` against a ``curl`` of
our endpoint), every broker connection silenced (a relay in front of Redis), then SIGTERM with a
log-shipper thread and ``kill -9`` of the started PID."""

from __future__ import annotations

import math
import resource
import signal
import socket
import statistics
import subprocess
import textwrap
import time

import psutil

from harness.broker import RedisServer
from harness.celery import busy, scheduler_up, started_after, succeeded
from harness.components import LEAKY_LOGGING
from harness.deployment import PYTHON
from harness.procs import wait_for
from harness.silence import SilenceableRelay
from lab import Lab, interleaved, ratios

#: Seconds after the silence within which consumption must come back to count.
SILENCE_LIMIT = 90.0
#: Probes of each kind per run.
PROBES = 5
#: What the safe worker runs with: the tests' short deadline and stall timeout.
SAFE_WORKER_ARGS = ["--shutdown-timeout", "30", "--task-drain-timeout", "5", "--stall-timeout", "20"]
CELERY_APP = "airflow.providers.celery.executors.celery_executor.app"


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _tree_cpu(top: int) -> float:
    """CPU seconds of ``top`` and every process below it, the ended ones included: a live process's
    own time and what its reaped children used (the pool processes reap the task processes), so
    that a task that ended within the window counts whole."""
    try:
        procs = [psutil.Process(top), *psutil.Process(top).children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _child_cpu_and_wall(cmd: list[str], env: dict) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, done.returncode


def run(lab: Lab, stock: bool, warmup: float, window: float, faults: bool = True) -> dict:
    dep, server = lab.deployment()
    redis = RedisServer(dep.home.parent / "redis").start()
    relay = SilenceableRelay(redis.port)
    try:
        dep.use_celery(redis)
        marks = busy(dep, dags=4, tasks=4, seconds=0.5, worker=False)
        worker = dep.worker(*([] if stock else SAFE_WORKER_ARGS), stock=stock,
                            AIRFLOW__CELERY__BROKER_URL=relay.url())
        scheduler_up(dep, server)
        wait_for(lambda: succeeded(server) >= 4, 300, interval=1, message="tasks through the worker")
        main = [worker.pid] if stock else [worker.pid, worker.job_pid]  # ours: the parent and the worker
        time.sleep(warmup)  # steady state first: the window starts after this
        first, cpu, tree = succeeded(server), _cpu(main), _tree_cpu(worker.pid)
        time.sleep(window)  # the measurement window
        done, cpu, tree = succeeded(server) - first, _cpu(main) - cpu, _tree_cpu(worker.pid) - tree
        overhead = {"tis_per_s": done / window, "worker_cpu_s_per_1000": cpu * 1000 / max(done, 1),
                    "worker_tree_cpu_s_per_1000": tree * 1000 / max(done, 1)}
        if not faults:
            return overhead

        probe_env = dict(dep.env, AIRFLOW__CELERY__BROKER_URL=redis.url)
        if stock:  # the chart's worker probe, as its template runs it (without the image's entrypoint)
            probe = [PYTHON, "-m", "celery", "--app", CELERY_APP, "inspect", "ping", "-d",
                     f"celery@{socket.gethostname()}"]
        else:
            probe = ["curl", "--fail", "--silent", "--show-error", "--max-time", "10",
                     f"http://127.0.0.1:{dep.endpoint_port('celery-worker')}/health"]
        probes = [_child_cpu_and_wall(probe, probe_env) for _ in range(PROBES)]

        relay.silence()
        silenced = time.time()  # the tasks' own start marks are wall-clock times
        # Up to 4 tasks (--concurrency) were received before the silence and start after it: the
        # fifth start is the first task received after it (tests/test_celery_worker.py, the same).
        try:
            starts = wait_for(lambda: started_after(marks, silenced)[4:], SILENCE_LIMIT, interval=0.25,
                              message="consumption")
            resumed = starts[0] - silenced
        except AssertionError:
            resumed = math.inf
        return {**overhead,
                "probe_cpu_s": statistics.median(p[0] for p in probes),
                "probe_wall_s": statistics.median(p[1] for p in probes),
                "probes_passed": sum(p[2] == 0 for p in probes),
                "silence_to_consuming_s": resumed, "alive_after_silence": worker.popen.poll() is None}
    finally:
        dep.cleanup()
        relay.close()
        redis.stop()
        server.destroy()


def stops(lab: Lab, stock: bool, limit: float) -> dict:
    """SIGTERM with a log-shipper thread: seconds to exit (inf past ``limit``) and what is left; then,
    in a second deployment, ``kill -9`` of the started PID: processes left 40 s later."""
    result = {}
    for fault in ("sigterm-with-thread", "kill-9"):
        dep, server = lab.deployment()
        redis = RedisServer(dep.home.parent / "redis").start()
        try:
            dep.use_celery(redis)
            env = {}
            if fault == "sigterm-with-thread":
                (dep.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
                env["AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS"] = "leaky_logging.LOGGING_CONFIG"
            busy(dep, dags=4, tasks=4, seconds=0.5, worker=False)
            worker = dep.worker(*([] if stock else SAFE_WORKER_ARGS), stock=stock, **env)
            scheduler_up(dep, server)
            wait_for(lambda: succeeded(server) >= 4, 300, interval=1, message="tasks through the worker")
            wait_for(lambda: len(worker.survivors()) >= 4, 60, message="the worker's children")
            if fault == "sigterm-with-thread":
                sent = worker.signal(signal.SIGTERM)
                code = worker.wait_exit(limit)
                result["sigterm_exit_s"] = worker.exited_at - sent if code is not None else math.inf
                result["sigterm_exit_code"] = code
                result["sigterm_left"] = len(worker.survivors_after(5.0))
            else:
                worker.signal(signal.SIGKILL)
                worker.wait_exit(10)
                # Ours: the worker stops itself (its parent's death signal), within its 30 s deadline.
                result["kill9_left"] = len(worker.survivors_after(40.0))
                result["kill9_of"] = len(worker.seen)
        finally:
            dep.cleanup()
            redis.stop()
            server.destroy()
    return result


def measure(lab: Lab, args) -> dict:
    warmup, window = (10, 30) if args.quick else (20, args.worker_window)
    only = args.worker_overhead_only  # the pairs alone: more of them in the same time
    faults = None if only else interleaved(1, lambda kind: stops(lab, kind == "stock", args.limit), "worker stops")
    runs = interleaved(args.reps, lambda kind: run(lab, kind == "stock", warmup, window, faults=not only), "worker")
    return {"runs": runs, "stops": faults}


def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and r[key] == r[key]]
    return statistics.median(values) if values else math.nan


def table(results: dict, args) -> list[str]:
    runs, stops_ = results["runs"], results["stops"]
    lines = ["", "## The Celery worker (stock `airflow celery worker` vs `airflow-safe-celery-worker "
             f"{' '.join(SAFE_WORKER_ARGS)}`, the same safe scheduler, a real Redis, 4 DAGs x 4 tasks of 0.5 s; "
             "medians; ratio = safe / stock)", "",
             "| measure | stock | safe | ratio |", "| --- | --- | --- | --- |"]
    for key, label in (("tis_per_s", "throughput (TIs/s)"),
                       ("worker_tree_cpu_s_per_1000", "the worker's CPU per 1000 TIs, every process of it (s)"),
                       ("worker_cpu_s_per_1000", "its main process's CPU per 1000 TIs (s; ours: with its parent)"),
                       ("probe_cpu_s", "liveness probe CPU (s per probe; stock: `celery inspect ping`, ours: curl)"),
                       ("probe_wall_s", "liveness probe wall time (s)"),
                       ("silence_to_consuming_s", f"broker connections silenced → consuming again (s; inf: not in {SILENCE_LIMIT:g} s)")):
        stock, safe = _median(runs["stock"], key), _median(runs["safe"], key)
        if math.isnan(stock) and math.isnan(safe):
            continue  # not measured in this run (--worker-overhead-only)
        ratio = f"{safe / stock:.3f}" if stock and math.isfinite(stock) else "—"
        lines.append(f"| {label} | {stock:.3g} | {safe:.3g} | {ratio} |")
    pairs = list(zip(runs["stock"], runs["safe"]))
    for key, label in (("tis_per_s", "throughput"), ("worker_tree_cpu_s_per_1000", "the worker's CPU per 1000 TIs"),
                       ("worker_cpu_s_per_1000", "its main process's CPU per 1000 TIs")):
        lines.append(ratios(label, [b[key] / a[key] for a, b in pairs if a.get(key) and key in b]))
    lines += _stops_table(stops_) if stops_ else []
    lines += ["", "Every sample (stock; safe): " + "; ".join(
                  f"{k}: {[round(r[k], 4) if isinstance(r[k], float) else r[k] for r in runs['stock']]} / "
                  f"{[round(r[k], 4) if isinstance(r[k], float) else r[k] for r in runs['safe']]}"
                  for k in runs["stock"][0] if all(k in r for r in runs["stock"] + runs["safe"]))]
    return lines


def _stops_table(stops_: dict) -> list[str]:
    s, o = stops_["stock"][0], stops_["safe"][0]
    return ["", "| fault on the worker | stock | safe |", "| --- | --- | --- |",
            f"| SIGTERM, log-shipper thread: exit after (s), code, processes left | {s['sigterm_exit_s']:.3g}, "
            f"{s['sigterm_exit_code']}, {s['sigterm_left']} | {o['sigterm_exit_s']:.3g}, {o['sigterm_exit_code']}, "
            f"{o['sigterm_left']} |",
            f"| `kill -9` of the started PID: processes left 40 s later, of all seen | {s['kill9_left']} of "
            f"{s['kill9_of']} | {o['kill9_left']} of {o['kill9_of']} |"]

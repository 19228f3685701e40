"""The Celery worker itself, stock ``airflow celery worker`` against ``airflow-safe-celery-worker``,
through a real Redis: throughput and the worker's CPU per 1000 task instances as it drains a queued
backlog (its own capacity: a worker fed at the scheduler's pace measures the scheduler), the
liveness probe's cost (the chart's ``celery inspect ping`` against a ``curl`` of
our endpoint), every broker connection silenced (a relay in front of Redis), then SIGTERM with a
log-shipper thread and ``kill -9`` of the started PID."""

from __future__ import annotations

import contextlib
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
from harness.celery import busy, queued, scheduler_up, started_after, starts, succeeded
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
#: The drain: DAGs of the busy kind, two runs of each at once, tasks that return at once.
DRAIN_DAGS = 8
#: Airflow's default ``[celery] worker_concurrency`` (the harness always passes one).
DRAIN_CONCURRENCY = 16
#: Seconds between samples of the worker's CPU during the drain.
SAMPLE = 0.5


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


class _Backlog:
    """One side of a drain: a deployment whose queue holds the backlog, then its worker."""

    def __init__(self, lab: Lab) -> None:
        self.dep, self.server = lab.deployment()
        self.redis = RedisServer(self.dep.home.parent / "redis").start()
        self.worker = None
        self.main: list[int] = []
        self.samples: list[tuple[float, float, float]] = []  # (wall clock, the whole worker's CPU, its main's)
        self.queued = self.enough = 0

    def fill(self, backlog: int) -> None:
        """Queue and publish ``backlog`` task instances (rounded down to whole DAG runs), then stop
        the scheduler and the dag-processor."""
        self.dep.use_celery(self.redis)
        tasks = max(1, backlog // (2 * DRAIN_DAGS))
        backlog = 2 * DRAIN_DAGS * tasks  # every task of two runs of each DAG
        # Only what lets the scheduler queue the whole backlog at once: Airflow's caps on what is
        # queued or running (the deployment's parallelism of 4, per DAG 16, the default pool's 128).
        self.dep.env.update(AIRFLOW__CORE__PARALLELISM=str(backlog),
                            AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=str(backlog))
        self.server.execute(f"UPDATE slot_pool SET slots = {backlog} WHERE pool = 'default_pool'")
        self.marks = busy(self.dep, dags=DRAIN_DAGS, tasks=tasks, seconds=0, worker=False)
        scheduler = scheduler_up(self.dep, self.server)
        # Queued in the DB is not yet sent: the executor publishes on its next heartbeat, and what
        # it has not published when the scheduler stops stays queued until task_queued_timeout.
        wait_for(lambda: queued(self.server) >= backlog and self.redis.queue_length() >= backlog, 600,
                 interval=1, message=f"{backlog} task instances queued and published")
        for proc in [scheduler, *(p for p in self.dep.started if "dag-processor" in p.cmd)]:
            proc.signal(signal.SIGTERM)
            if proc.wait_exit(60) is None:
                raise AssertionError(f"{' '.join(proc.cmd)} did not stop")
        self.queued = self.redis.queue_length()
        #: Starts up to the last tenth's first: where the measured span may end.
        self.enough = self.queued - self.queued // 10

    def start(self, stock: bool) -> None:
        self.worker = self.dep.worker(*([] if stock else SAFE_WORKER_ARGS), stock=stock,
                                      concurrency=DRAIN_CONCURRENCY)
        self.main = [self.worker.pid] if stock else [self.worker.pid, self.worker.job_pid]  # ours: with its parent

    def sample(self) -> None:
        self.samples.append((time.time(), _tree_cpu(self.worker.pid), _cpu(self.main)))

    def far_enough(self) -> bool:
        return starts(self.marks) >= self.enough

    def close(self) -> None:
        self.dep.cleanup()
        self.redis.stop()
        self.server.destroy()


def drain(lab: Lab, backlog: int, first: str) -> dict[str, dict]:
    """The worker's own capacity, stock and safe side by side: on two deployments the safe
    scheduler queues ``backlog`` task instances with no worker and is stopped (and on Airflow 3 the
    dag-processor too); then both workers start at once, ``first`` a moment before the other, at
    Airflow's default concurrency, and drain their queues on the same two cores. One after the
    other, the machine's drift between two runs a few minutes apart was most of the spread (3 pairs:
    throughput 0.96–1.16); at once, it hits both alike.

    Throughput and CPU are read over the span where both were past the starts of their first
    tenth and short of their last, so that each queue still held more than its pool runs and
    neither worker's start-up nor the other's end is in it. Start times come from the tasks' own
    marks; each worker's CPU is sampled every ``SAMPLE`` s and read between samples."""
    with contextlib.ExitStack() as stack:
        sides = {}
        for kind in ("stock", "safe"):
            sides[kind] = _Backlog(lab)
            stack.callback(sides[kind].close)
            sides[kind].fill(backlog)
        for kind in sorted(sides, key=lambda kind: kind != first):
            sides[kind].start(kind == "stock")
        deadline = time.monotonic() + 900
        while True:
            done = all(side.far_enough() for side in sides.values())
            for side in sides.values():
                side.sample()
            if done:
                break  # one sample past the span's end is all the reading needs
            if time.monotonic() > deadline:
                raise AssertionError(f"no drain reached its last tenth in 900 s: {[starts(s.marks) for s in sides.values()]} "
                                     f"of {[s.queued for s in sides.values()]} task instances started")
            time.sleep(SAMPLE)
        times = {kind: started_after(side.marks, 0) for kind, side in sides.items()}
        lo = max(times[kind][side.queued // 10 - 1] for kind, side in sides.items())
        hi = min(times[kind][side.enough - 1] for kind, side in sides.items())
        if hi <= lo:
            raise AssertionError("the two drains did not overlap")
        result = {}
        for kind, side in sides.items():
            done = sum(lo < t <= hi for t in times[kind])
            tree = _at(side.samples, hi, 1) - _at(side.samples, lo, 1)
            cpu = _at(side.samples, hi, 2) - _at(side.samples, lo, 2)
            result[kind] = {"tis_per_s": done / (hi - lo), "worker_tree_cpu_s_per_1000": tree * 1000 / done,
                            "worker_cpu_s_per_1000": cpu * 1000 / done, "drained": side.queued,
                            "window_s": hi - lo, "started_first": kind == first}
        return result


def _at(samples: list[tuple[float, float, float]], when: float, column: int) -> float:
    """``column`` of the samples at ``when``, read on the straight line between the two around it."""
    for (t0, *a), (t1, *b) in zip(samples, samples[1:]):
        if t0 <= when <= t1:
            share = (when - t0) / (t1 - t0) if t1 > t0 else 0.0
            return a[column - 1] + share * (b[column - 1] - a[column - 1])
    raise AssertionError(f"no CPU sample around {when}")


def run(lab: Lab, stock: bool) -> dict:
    """The liveness probe's cost, then every broker connection silenced, under a steady load."""
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
        return {"probe_cpu_s": statistics.median(p[0] for p in probes),
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
    backlog = 64 if args.quick else args.worker_backlog
    only = args.worker_overhead_only  # the pairs alone: more of them in the same time
    faults = None if only else interleaved(1, lambda kind: stops(lab, kind == "stock", args.limit), "worker stops")
    runs = None if only else interleaved(args.reps, lambda kind: run(lab, kind == "stock"), "worker probe, silence")
    drains: dict[str, list] = {"stock": [], "safe": []}
    for rep in range(args.reps):
        pair = drain(lab, backlog, first=("stock", "safe")[rep % 2])  # who starts first, in turn
        for kind in drains:
            drains[kind].append(pair[kind])
        print(f"worker drain [{rep + 1}/{args.reps}]: {pair}", flush=True)
    return {"drains": drains, "runs": runs, "stops": faults}


def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and r[key] == r[key]]
    return statistics.median(values) if values else math.nan


def table(results: dict, args) -> list[str]:
    drains, runs, stops_ = results["drains"], results["runs"], results["stops"]
    lines = ["", "## The Celery worker (stock `airflow celery worker` vs `airflow-safe-celery-worker "
             f"{' '.join(SAFE_WORKER_ARGS)}`, a real Redis; medians; ratio = safe / stock)", "",
             f"Throughput and CPU: a backlog of {drains['stock'][0]['drained']} queued task instances (busy DAGs, "
             f"tasks that return at once) drained with `--concurrency {DRAIN_CONCURRENCY}` (Airflow's default), "
             "the scheduler stopped, stock and safe at once on two deployments; read over the span where both "
             "were past their first tenth and short of their last. The probe and the silence: "
             "the safe scheduler feeding 4 DAGs x 4 tasks of 0.5 s.", "",
             "| measure | stock | safe | ratio |", "| --- | --- | --- | --- |"]
    rows = (("tis_per_s", "throughput (TIs/s)", drains),
            ("worker_tree_cpu_s_per_1000", "the worker's CPU per 1000 TIs, every process of it (s)", drains),
            ("worker_cpu_s_per_1000", "its main process's CPU per 1000 TIs (s; ours: with its parent)", drains),
            ("probe_cpu_s", "liveness probe CPU (s per probe; stock: `celery inspect ping`, ours: curl)", runs),
            ("probe_wall_s", "liveness probe wall time (s)", runs),
            ("silence_to_consuming_s", f"broker connections silenced → consuming again (s; inf: not in {SILENCE_LIMIT:g} s)", runs))
    for key, label, source in rows:
        if not source:
            continue  # not measured in this run (--worker-overhead-only)
        stock, safe = _median(source["stock"], key), _median(source["safe"], key)
        ratio = f"{safe / stock:.3f}" if stock and math.isfinite(stock) else "—"
        lines.append(f"| {label} | {stock:.3g} | {safe:.3g} | {ratio} |")
    pairs = list(zip(drains["stock"], drains["safe"]))
    lines.append("")
    for key, label in (("tis_per_s", "throughput"), ("worker_tree_cpu_s_per_1000", "the worker's CPU per 1000 TIs"),
                       ("worker_cpu_s_per_1000", "its main process's CPU per 1000 TIs")):
        lines.append(ratios(label, [b[key] / a[key] for a, b in pairs if a.get(key) and key in b]))
    lines += _stops_table(stops_) if stops_ else []
    for name, source in (("drain", drains), ("probe and silence", runs)):
        if source:
            lines += ["", f"Every sample, {name} (stock / safe): " + "; ".join(
                f"{k}: {[round(r[k], 4) if isinstance(r[k], float) else r[k] for r in source['stock']]} / "
                f"{[round(r[k], 4) if isinstance(r[k], float) else r[k] for r in source['safe']]}"
                for k in source["stock"][0] if all(k in r for r in source["stock"] + source["safe"]))]
    return lines


def _stops_table(stops_: dict) -> list[str]:
    s, o = stops_["stock"][0], stops_["safe"][0]
    return ["", "| fault on the worker | stock | safe |", "| --- | --- | --- |",
            f"| SIGTERM, log-shipper thread: exit after (s), code, processes left | {s['sigterm_exit_s']:.3g}, "
            f"{s['sigterm_exit_code']}, {s['sigterm_left']} | {o['sigterm_exit_s']:.3g}, {o['sigterm_exit_code']}, "
            f"{o['sigterm_left']} |",
            f"| `kill -9` of the started PID: processes left 40 s later, of all seen | {s['kill9_left']} of "
            f"{s['kill9_of']} | {o['kill9_left']} of {o['kill9_of']} |"]

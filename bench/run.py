"""Benchmark: how fast a broken scheduler (triggerer, dag-processor) gets out of the way, and what the
safety costs a healthy one — stock ``airflow scheduler`` and ``airflow-safe-scheduler`` (and the
triggerer's and dag-processor's pairs, for fault to exit) side by side, in the same run,
against real PostgreSQL servers. Reports medians, maxima and safe/stock ratios, never a single
absolute time (this machine is noisy). Writes ``bench/results/latest.md`` and ``latest.png``.

    scripts/bench                 # full: 5 repetitions, 50 DAGs x 20 tasks
    scripts/bench --quick         # 1 repetition, small load: proves it works

The liveness-probe rows compare the chart's own probe command (``airflow jobs check``, taken from the
real chart rendered by helm) with ours (the overlay's curl, and the kubelet's httpGet), against the
same live safe components; they need ``scripts/k8s-tools`` (helm).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import urllib.request
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# This process imports Airflow too (through the test helpers): keep its airflow.cfg out of ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="safe-scheduler-bench-home-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)

import pg  # noqa: E402
from conftest import HEALTH_PORTS, PYTHON, Deployment, base_env  # noqa: E402
from procs import stop, threads_of, wait_for  # noqa: E402
from jobservice import JobService  # noqa: E402
from test_components import heartbeating, prepare, started as component_started  # noqa: E402
from test_components import wait_parsing, with_parsing_process  # noqa: E402
from test_faults import HANGING_SHUTDOWN_PLUGIN, LEAKY_THREAD_PLUGIN, running_tasks, with_running_tasks  # noqa: E402
from test_running_tasks import write_dag  # noqa: E402
from broker import RedisServer  # noqa: E402
from test_celery import busy, failed, scheduler_up, succeeded  # noqa: E402

SAFE_ARGS = ["--shutdown-timeout", "10", "--child-stop-timeout", "3", "--stall-timeout", "10"]

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


COMPONENTS = ("scheduler", "triggerer", "dag-processor")
#: Seconds after the broker's return over which the Celery run counts the recovered work.
AFTER_OUTAGE = 30.0
#: multiprocessing's start methods; 2.x reads ``[core] mp_start_method`` only for its DAG processor.
START_METHODS = ("fork", "forkserver", "spawn")


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        home = root / "template-home"
        home.mkdir()
        print("building the migrated PostgreSQL template ...", flush=True)
        self.template = pg.make_template(root, base_env(home), PYTHON)

    def deployment(self) -> tuple[Deployment, pg.PgServer]:
        work = Path(tempfile.mkdtemp(prefix="run-", dir=self.root))
        work.chmod(0o755)
        server = pg.clone(self.template, work / "data")
        server.start()
        return Deployment(work / "airflow", server.url), server

    # -- fault to exit -------------------------------------------------------------------------

    def fault_to_exit(self, name: str, stock: bool, limit: float, component: str = "scheduler") -> dict:
        plugin, fault = SCENARIOS[name]
        dep, server = self.deployment()
        try:
            if plugin:  # a listener's thread, atexit handler or hang: it fires for every job type
                dep.add_plugin("bench_plugin", plugin)
            args = [] if stock else SAFE_ARGS
            if component == "scheduler":
                scheduler = dep.scheduler(*args, stock=stock)
                scheduler.wait_healthy()
                wait_for(lambda: len(scheduler.descendants_named("worker")) >= 4, 60, message="workers")
            else:
                prepare(dep, component)
                scheduler = dep.component(component, *args, stock=stock)
                wait_for(heartbeating(server, scheduler, component), 120, interval=0.5, message="a heartbeat")
            started = time.monotonic()
            {"stop": lambda: server.stop("immediate"), "freeze": server.freeze,
             "sigterm": lambda: scheduler.signal(signal.SIGTERM),
             "sigkill": lambda: scheduler.signal(signal.SIGKILL),
             "sigkill-job": lambda: os.kill(scheduler.job_pid, signal.SIGKILL)}[fault]()
            code, seconds = _gone(scheduler, started, limit)
            orphans = len(scheduler.survivors()) if code is not None else None
            return {"seconds": seconds, "code": code, "orphans": orphans}
        finally:
            dep.cleanup()
            server.destroy()

    # -- kill -9 under each start method --------------------------------------------------------

    def kill_by_method(self, component: str, method: str, target: str, stock: bool, wait: float) -> dict:
        """``kill -9`` of the PID the user started (``top``) or of the job process (``job``; for stock
        the same process), with ``[core] mp_start_method`` set to ``method``. The scheduler has two
        LocalExecutor tasks running, the triggerer its serve-logs, the dag-processor a parsing
        process. How many of the processes the tree ever held are still alive once none are left or
        ``wait`` seconds have passed, and when the last one went."""
        dep, server = self.deployment()
        try:
            dep.env["AIRFLOW__CORE__MP_START_METHOD"] = method
            if component == "scheduler":
                marks = dep.home.parent / "marks"
                with_running_tasks(dep, marks)
                proc = dep.scheduler(*([] if stock else SAFE_ARGS), stock=stock)
                running_tasks(proc, marks)
            else:
                if component == "dag-processor":
                    with_parsing_process(dep)
                proc = component_started(dep, server, component, *([] if stock else SAFE_ARGS), stock=stock)
                if component == "dag-processor":
                    wait_parsing(proc)
            seen = len(proc.survivors())
            killed = time.monotonic()
            os.kill(proc.pid if target == "top" else proc.job_pid, signal.SIGKILL)
            left = proc.survivors_after(wait)
            return {"seen": seen, "left": len(left), "seconds": None if left else time.monotonic() - killed,
                    "left_names": sorted(filter(None, (_cmdline(p)[:60] for p in left)))}
        finally:
            dep.cleanup()
            server.destroy()

    # -- stop with tasks running ---------------------------------------------------------------

    def stop_with_tasks(self, tasks: int, fault: str, stock: bool, limit: float) -> dict:
        """``tasks`` LocalExecutor tasks each started an external job (cancelled by ``on_termination``
        when the task is stopped); then the DB is stopped or SIGTERM sent. Seconds until the whole
        tree is gone, exit code, and how many external jobs were cancelled (the cleanups that ran)."""
        dep, server = self.deployment()
        service = JobService()
        try:
            write_dag(dep.home / "dags", service.url, tasks=tasks)
            dep.env.update(AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
                           AIRFLOW__CORE__PARALLELISM=str(max(4, tasks)))
            dep.start_task_services()
            scheduler = dep.scheduler(*([] if stock else SAFE_ARGS), stock=stock)
            wait_for(lambda: len(service.jobs) >= tasks, 300, interval=0.5, message=f"{tasks} jobs started")
            started = time.monotonic()
            if fault == "stop":
                server.stop("immediate")
            else:
                scheduler.signal(signal.SIGTERM)
            code, seconds = _gone(scheduler, started, limit)
            cancelled = sum(1 for state in service.jobs.values() if state == "cancelled")
            return {"seconds": seconds, "code": code, "cancelled": cancelled, "jobs": tasks}
        finally:
            dep.cleanup()
            service.close()
            server.destroy()

    # -- CeleryExecutor ------------------------------------------------------------------------

    def celery(self, stock: bool, warmup: float, window: float, outage: float) -> dict:
        """Under a busy load through a real Redis and ``airflow celery worker``: task instances per
        second, the scheduler's CPU per 1000 of them, then the broker stopped for ``outage`` seconds
        and the seconds from its return to the next successful task instance (and how many task
        instances failed meanwhile)."""
        dep, server = self.deployment()
        redis = RedisServer(dep.home.parent / "redis").start()
        try:
            dep.use_celery(redis)
            busy(dep, dags=4, tasks=4, seconds=0.5)
            scheduler = scheduler_up(dep, server, *([] if stock else SAFE_ARGS), stock=stock)
            wait_for(lambda: succeeded(server) >= 4, 300, interval=1, message="tasks through the worker")
            proc = psutil.Process(scheduler.job_pid)
            time.sleep(warmup)  # steady state first: the measurement window starts after this
            first, cpu, ours = succeeded(server), sum(proc.cpu_times()[:2]), sum(_ours(proc.pid))
            time.sleep(window)  # the measurement window
            done, cpu = succeeded(server) - first, sum(proc.cpu_times()[:2]) - cpu
            ours = sum(_ours(proc.pid)) - ours  # our threads' share of ``cpu`` (0 for stock)
            failed_before = failed(server)
            redis.stop()
            time.sleep(outage)  # the outage itself
            before = succeeded(server)
            starting_wall = time.time()
            redis.start()  # returns once Redis answers: the worker may have connected just before
            back, back_wall = time.monotonic(), time.time()
            wait_for(lambda: succeeded(server) > before, 300, interval=0.05, message="a success after the outage")
            recovery = time.monotonic() - back
            # How much work the recovery does, not only how soon it starts: successes in the 30 s
            # after the broker's return (stock failed what was queued during the outage; ours holds it).
            time.sleep(max(0.0, back + AFTER_OUTAGE - time.monotonic()))
            done_after = succeeded(server) - before
            # The worker reconnects on its own backoff (2, 4, 6 ... s), the same for stock and safe,
            # then syncs with its peers ("mingle", ~1 s) before it takes a task: the scheduler's
            # share is whatever the first task arrives after the worker is ready for it.
            worker_log = dep.home / "celery.log"
            reconnected = _worker_log_after(worker_log, starting_wall, "Connected to")
            ready = _worker_log_after(worker_log, starting_wall, "mingle: all alone")
            received = _worker_log_after(worker_log, starting_wall, "] received")
            lead = back_wall - starting_wall
            nan = float("nan")
            return {"tis_per_s": done / window, "cpu_s_per_1000": cpu * 1000 / max(done, 1),
                    "cpu_s_per_min": cpu * 60 / window, "ours_cpu_s_per_min": ours * 60 / window,
                    "recovery_s": recovery,
                    "after_worker_reconnect_s": recovery - max(0.0, reconnected - lead) if reconnected is not None else nan,
                    "worker_ready_to_task_s": received - ready if received is not None and ready is not None else nan,
                    f"succeeded_{AFTER_OUTAGE:g}s_after": done_after,
                    "failed_in_outage": failed(server) - failed_before}
        finally:
            dep.cleanup()
            redis.stop()
            server.destroy()

    # -- liveness probe cost --------------------------------------------------------------------

    def probe_cost(self, component: str, cli_runs: int, curl_runs: int, http_runs: int) -> dict:
        """CPU per liveness probe against one live safe component: the chart's command, our
        overlay's curl (the probe process plus our endpoint's thread), and an httpGet as the kubelet
        sends it (our endpoint's thread only: the kubelet's side is outside the pod)."""
        stock_commands, our_commands = chart_probe(overlay=False), chart_probe(overlay=True)
        dep, server = self.deployment()
        try:
            prepare(dep, component)
            proc = dep.component(component)
            wait_for(heartbeating(server, proc, component), 120, interval=0.5, message="a heartbeat")
            env = dict(dep.env, PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
            # Our endpoint on its default port, as the overlay's probe expects it (one component at a time).
            port = dep.endpoint_port(component)
            ours = [part.replace(f":{HEALTH_PORTS[component]}/", f":{port}/") for part in our_commands[component]]
            cli = [_measured(stock_commands[component], env) for _ in range(cli_runs)]
            if any(code != 0 for code, _, _ in cli):
                raise RuntimeError(f"the chart's probe failed against a healthy {component}: {cli}")
            server_cpu = lambda: sum(cpu for name, cpu in threads_of(proc.job_pid).values() if name == "safe-health")  # noqa: E731
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

    # -- overhead ------------------------------------------------------------------------------

    def startup(self, stock: bool) -> float:
        dep, server = self.deployment()
        try:
            begun = time.monotonic()
            scheduler = dep.scheduler(*([] if stock else SAFE_ARGS), stock=stock)
            scheduler.wait_healthy()
            return time.monotonic() - begun
        finally:
            dep.cleanup()
            server.destroy()

    def idle(self, stock: bool, seconds: float) -> dict:
        """RSS and CPU of the scheduler process while it has nothing to do, and of our threads in it.

        Our threads carry ``safe-…`` kernel names (``safe_scheduler.threads``), so their share is
        read per thread from /proc; the stock scheduler has none, which reads as 0.
        """
        dep, server = self.deployment()
        try:
            scheduler = dep.scheduler(*([] if stock else SAFE_ARGS), stock=stock)
            scheduler.wait_healthy()
            time.sleep(5)  # settle after start-up: this is a measurement window, not an assertion
            job = psutil.Process(scheduler.job_pid)
            # Ours: the job process and the tiny parent above it (``reaper``); stock: the one process.
            procs = [job] if stock else [job, psutil.Process(scheduler.pid)]
            before, ours_before = _cpu(procs), sum(_ours(job.pid))
            parent_before = 0.0 if stock else _cpu(procs[1:])
            time.sleep(seconds)
            used, ours_now = _cpu(procs) - before, _ours(job.pid)
            parent_used = 0.0 if stock else _cpu(procs[1:]) - parent_before
            if not stock and not ours_now:
                raise RuntimeError("no safe-… threads found in the safe scheduler: cannot measure their CPU")
            return {"rss_mb": sum(p.memory_info().rss for p in procs) / 2**20, "cpu_s_per_min": used * 60 / seconds,
                    "ours_pct_core": (sum(ours_now) - ours_before) * 100 / seconds,
                    "parent_rss_mb": 0.0 if stock else procs[1].memory_info().rss / 2**20,
                    "parent_pct_core": parent_used * 100 / seconds}
        finally:
            dep.cleanup()
            server.destroy()

    def throughput(self, stock: bool, dags: int, tasks: int, warmup: float, window: float) -> dict:
        """Task instances the scheduler finishes per second while it never runs out of work, and the
        scheduler process's CPU seconds per 1000 of them (less sensitive to a noisy neighbour).

        EmptyOperator tasks are set to success by the scheduler itself, so this is scheduling work
        only (DAG runs created, dependencies checked, states written), no executor or task runtime.
        Catch-up over a year of one-minute intervals never runs dry, and with
        ``scheduler_idle_sleep_time = 0`` the loop never waits: both schedulers are CPU-bound for the
        whole window. The DAG processor is stopped once the DAGs are serialized so that it does not
        share the two cores with what we measure.
        """
        dep, server = self.deployment()
        dag_file = textwrap.dedent(LOAD_DAGS.format(dags=dags, tasks=tasks))
        (dep.home / "dags" / "load.py").write_text(dag_file)
        dep.env.update(
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="0",
        )
        try:
            processor = dep.airflow("dag-processor")
            wait_for(lambda: server.execute("SELECT count(*) FROM serialized_dag")[0][0] >= dags, 300,
                     interval=1, message="the DAGs to be parsed")
            stop(processor.popen, 30)
            scheduler = dep.scheduler(*([] if stock else SAFE_ARGS), stock=stock)
            scheduler.wait_healthy()
            count = "SELECT count(*) FROM task_instance WHERE state = 'success'"
            proc = psutil.Process(scheduler.job_pid)
            time.sleep(warmup)  # first DAG runs created; measurement starts in the steady state
            first, cpu = server.execute(count)[0][0], sum(proc.cpu_times()[:2])
            time.sleep(window)  # the measurement window
            done, cpu = server.execute(count)[0][0] - first, sum(proc.cpu_times()[:2]) - cpu
            if done == 0:
                raise RuntimeError(f"nothing was scheduled; see {dep.home}/scheduler-0.log")
            return {"tis_per_s": done / window, "cpu_s_per_1000": cpu * 1000 / done}
        finally:
            dep.cleanup()
            server.destroy()


def _gone(scheduler, started: float, limit: float) -> tuple[int | None, float | None]:
    """Exit code, and seconds from ``started`` until the whole tree (the scheduler and every process
    it forked) is gone; None for the seconds if that did not happen within ``limit``."""
    code = scheduler.wait_exit(limit)
    while scheduler.survivors() and time.monotonic() - started < limit:
        time.sleep(0.05)
    took = time.monotonic() - started
    return code, (took if code is not None and not scheduler.survivors() else None)


def _cmdline(proc: psutil.Process) -> str:
    """The first three words of its command line; "" once it has gone."""
    try:
        return " ".join(proc.cmdline()[:3])
    except psutil.Error:
        return ""


def _worker_log_after(log: Path, since: float, needle: str) -> float | None:
    """Seconds from ``since`` (wall clock) to the worker's first log line holding ``needle`` after it."""
    import datetime
    import re

    for line in log.read_text(errors="replace").splitlines():
        if needle not in line:
            continue
        # Airflow 3's worker logs ISO UTC ("2026-12-01T22:23:47.701601Z"); Celery's own format, on
        # 2.x, is local time ("[2026-12-01 20:14:31,483: INFO/MainProcess]").
        stamp = re.search(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?)(Z?)", line)
        if stamp:
            at = datetime.datetime.fromisoformat(stamp.group(1).replace(",", "."))
            if stamp.group(2):
                at = at.replace(tzinfo=datetime.timezone.utc)
            if at.timestamp() >= since:
                return at.timestamp() - since
    return None


def chart_probe(overlay: bool) -> dict[str, list[str]]:
    """Each component's liveness probe command as the real chart renders it, stock or with our overlay.

    The chart's command runs the image's ``/entrypoint``, which with ``CONNECTION_CHECK_MAX_COUNT=0``
    only ``exec``s its arguments: here the arguments run directly.
    """
    from test_chart import container, render

    version = [] if overlay else ["--set", "airflowVersion=3.3.2", "--set", "defaultAirflowTag=3.3.2"]
    docs = render(dict(os.environ), *version, overlay=overlay, validate=False)
    return {name: [part.replace("exec /entrypoint \\\n", "exec ") for part in
                   container(docs, name)["livenessProbe"]["exec"]["command"]] for name in COMPONENTS}


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


def _measured(cmd: list[str], env: dict) -> tuple[int, float, float]:
    """Exit code, CPU seconds (user + system) and peak RSS (MB) of one probe process."""
    done = subprocess.run([sys.executable, "-S", "-c", MEASURE, *cmd], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=True)
    code, cpu, rss = json.loads(done.stdout)
    return code, cpu, rss


def _cpu(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def _ours(pid: int) -> list[float]:
    """CPU seconds used so far by each of the scheduler's ``safe-…`` threads."""
    return [cpu for name, cpu in threads_of(pid).values() if name.startswith("safe-")]


LOAD_DAGS = """
    from datetime import datetime, timedelta
    from airflow.sdk import DAG
    from airflow.providers.standard.operators.empty import EmptyOperator

    for n in range({dags}):
        with DAG(f"load_{{n}}", schedule=timedelta(minutes=1), start_date=datetime(2026, 1, 1),
                 catchup=True, max_active_runs=16) as dag:
            for t in range({tasks}):
                EmptyOperator(task_id=f"t{{t}}")
        globals()[dag.dag_id] = dag
"""


OURS = "idle CPU of our threads (% of a core)"
PARENT_RSS = "idle RSS of our parent process alone (MB)"


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def _fmt(value: float | None, limit: float) -> str:
    return f"never (> {limit:g} s)" if value is None else f"{value:.1f}"


def _tasks_table(stops: dict, limit: float) -> list[str]:
    lines = ["", "## Stop with tasks running (LocalExecutor; each task cancels its external job in "
             "`on_termination`)", "",
             "| scenario | stock median s | stock exit codes | stock jobs cancelled | safe median s | "
             "safe exit codes | safe jobs cancelled |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in stops.items():
        row = [name]
        for kind in ("stock", "safe"):
            secs = [r["seconds"] for r in runs[kind]]
            median = statistics.median(secs) if None not in secs else None
            cancelled = ", ".join(f"{r['cancelled']}/{r['jobs']}" for r in runs[kind])
            row += [_fmt(median, limit), ", ".join(sorted({str(r["code"]) for r in runs[kind]})), cancelled]
        lines.append("| " + " | ".join(row) + " |")
    return lines


#: The chart's liveness probe period for the three components (values.yaml: periodSeconds 60).
PROBES_PER_HOUR = 3600 / 60


def _celery_table(celery: dict) -> list[str]:
    lines = ["", "## CeleryExecutor (a real Redis broker and `airflow celery worker`, 4 DAGs x 4 tasks of 0.5 s; "
             "medians; ratio = safe / stock)", "", "| measure | stock | safe | ratio |", "| --- | --- | --- | --- |"]
    for key, label in (("tis_per_s", "throughput (TIs/s)"), ("cpu_s_per_1000", "scheduler CPU per 1000 TIs (s)"),
                       ("cpu_s_per_min", "scheduler CPU (s per minute)"),
                       ("ours_cpu_s_per_min", "of which our threads (s per minute)"),
                       ("recovery_s", "broker back → next successful TI (s)"),
                       ("after_worker_reconnect_s", "worker reconnected → next successful TI (s)"),
                       ("worker_ready_to_task_s", "worker ready → first task received (s): the scheduler's share"),
                       (f"succeeded_{AFTER_OUTAGE:g}s_after", f"task instances succeeded in the {AFTER_OUTAGE:g} s after the broker's return"),
                       ("failed_in_outage", "task instances failed during the broker outage")):
        stock, safe = (statistics.median([r[key] for r in celery[kind] if key in r and r[key] == r[key]] or [math.nan])
                       for kind in ("stock", "safe"))
        ratio = f"{safe / stock:.3f}" if stock else "(stock: 0)"
        lines.append(f"| {label} | {stock:.3g} | {safe:.3g} | {ratio} |")
    pairs = list(zip(celery["stock"], celery["safe"]))  # run in pairs: stock, then safe
    lines.append("")
    for key, label in (("recovery_s", "broker back → next successful TI"),
                       ("after_worker_reconnect_s", "worker reconnected → next successful TI")):
        diffs = sorted(b[key] - a[key] for a, b in pairs if a[key] == a[key] and b[key] == b[key])
        if diffs:
            lines.append(f"* {label}, safe − stock per pair: median {statistics.median(diffs):+.3f} s, "
                         f"safe no later in {sum(d <= 0 for d in diffs)} of {len(diffs)} pairs "
                         f"(range {diffs[0]:+.3f} … {diffs[-1]:+.3f} s)")
    lines += ["", "Every sample (stock; safe): " + "; ".join(
        f"{k}: {[round(r[k], 3) for r in celery['stock']]} / {[round(r[k], 3) for r in celery['safe']]}"
        for k in celery["stock"][0])]
    return lines


def _probes_table(probes: dict) -> list[str]:
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


def _kills_table(kills: dict, wait: float) -> list[str]:
    lines = ["", f"## kill -9 under each start method (processes still alive {wait:g} s after the kill, of all "
             "there were below the PID the user started; worst of the repetitions)", "",
             "`[core] mp_start_method` set through `AIRFLOW__CORE__MP_START_METHOD`. The scheduler has two "
             "LocalExecutor tasks running (Airflow 3: with a real api-server and dag-processor beside it), the "
             "triggerer its serve-logs, the dag-processor a parsing process that never ends. Stock has one "
             "process for both targets.", "",
             "| component | start method | stock, kill -9 | safe, kill -9 of the PID the user started | "
             "safe, kill -9 of the job process |",
             "| --- | --- | --- | --- | --- |"]

    def cell(runs: list[dict]) -> str:
        """Left of all there were below the killed PID, and when the last went (worst run)."""
        worst = max(runs, key=lambda r: (r["left"], r["seconds"] or 0.0))
        gone = f" (all gone after {worst['seconds']:.1f} s)" if worst["seconds"] is not None else ""
        return f"{worst['left']} of {worst['seen']}{gone}"

    for (component, method), runs in kills.items():
        lines.append(f"| {component} | {method} | {cell(runs['stock'])} | {cell(runs['safe top'])} | "
                     f"{cell(runs['safe job'])} |")
    left = sorted({name for runs in kills.values() for r in runs["stock"] for name in r["left_names"]})
    if left:
        lines += ["", "What stock left (command lines, first 60 characters): " + "; ".join(f"`{n}`" for n in left)]
    return lines


def report(faults: dict, overhead: dict, args, out: Path, stops: dict | None = None,
           probes: dict | None = None, celery: dict | None = None, kills: dict | None = None) -> str:
    import airflow

    lines = [
        "# Benchmark: stock Airflow vs `airflow-safe-scheduler`"
        + ("" if set(args.components) == {"scheduler"} else " (and its triggerer and dag-processor)"),
        "",
        f"Airflow {airflow.__version__}, {os.cpu_count()} cores, {args.reps} repetition(s), "
        f"limit {args.limit:g} s. Safe scheduler flags: `{' '.join(SAFE_ARGS)}`. Command: "
        f"`{' '.join(['scripts/bench', *sys.argv[1:]])}`.",
    ]
    if faults:
        lines += [
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
            row += [_fmt(median, args.limit), _fmt(worst, args.limit), ", ".join(codes),
                    "still running" if None in orphans else str(max(orphans))]
        lines.append("| " + " | ".join(row) + " |")
    if kills:
        lines += _kills_table(kills, args.kill_wait)
    if stops:
        lines += _tasks_table(stops, args.limit)
    if probes:
        lines += _probes_table(probes)
    if celery:
        lines += _celery_table(celery)
    if overhead:
        lines += ["", "## Overhead on a healthy scheduler (medians; ratio = safe / stock)", "",
                  "| measure | stock | safe | ratio |", "| --- | --- | --- | --- |"]
        for measure, (stock, safe) in overhead["rows"].items():
            ratio = f"{safe / stock:.3f}" if stock else "(stock has none)"
            lines.append(f"| {measure} | {stock:.3g} | {safe:.3g} | {ratio} |")
        if OURS in overhead["rows"]:
            tick = 100 / os.sysconf("SC_CLK_TCK") / args.idle_window
            lines += ["", f"Our threads' CPU is read per thread from /proc in clock ticks: over one {args.idle_window:g} s "
                      f"idle window a single tick is {tick:.3f} % of a core, so 0 means less than that."]
        lines += ["", "Every sample (stock, then safe), in run order:", ""]
        for measure, kinds in overhead["samples"].items():
            lines.append(f"* {measure}: stock {_list(kinds['stock'])}; safe {_list(kinds['safe'])}")
    text = "\n".join(lines) + "\n"
    (out / "latest.md").write_text(text)
    (out / "latest.json").write_text(
        json.dumps({"faults": faults, "overhead": overhead, "stop_with_tasks": stops, "probes": probes,
                    "celery": celery, "kill_by_start_method": {" / ".join(k): v for k, v in (kills or {}).items()}},
                   indent=1, default=str)
    )
    return text


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, small load, short windows")
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default 5, quick 1)")
    parser.add_argument("--limit", type=float, help="seconds after which a process counts as never gone (60, quick 45)")
    parser.add_argument("--scenarios", nargs="*", choices=list(SCENARIOS), help="default: all")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead measures")
    parser.add_argument("--no-faults", action="store_true", help="skip the fault-to-exit scenarios")
    parser.add_argument("--components", nargs="*", choices=COMPONENTS, default=list(COMPONENTS),
                        help="whose fault to exit to measure (default: all three)")
    parser.add_argument("--tasks", type=int, nargs="*", default=None,
                        help="stop with N tasks running, for each N (default 1 16; quick: 1; none: skip)")
    parser.add_argument("--no-probes", action="store_true", help="skip the liveness probe cost")
    parser.add_argument("--no-celery", action="store_true", help="skip the CeleryExecutor run")
    parser.add_argument("--start-methods", nargs="*", choices=START_METHODS, default=list(START_METHODS),
                        help="kill -9 of each component under these start methods (default: all; none: skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.reps = args.reps or (1 if args.quick else 5)
    args.limit = args.limit or (45.0 if args.quick else 60.0)
    args.idle_window = 20.0 if args.quick else 60.0
    args.kill_wait = 10.0 if args.quick else 30.0
    args.out.mkdir(parents=True, exist_ok=True)

    root = Path(tempfile.mkdtemp(prefix="safe-scheduler-bench-", dir="/tmp"))
    root.chmod(0o755)
    try:
        bench = Bench(root)
        faults: dict = {}
        for component in [] if args.no_faults else args.components:
            for scenario in args.scenarios or SCENARIOS:
                name = scenario if component == "scheduler" else f"{component}: {scenario}"
                faults[name] = {"stock": [], "safe": []}
                for rep in range(args.reps):
                    for kind in ("stock", "safe"):  # interleaved, so drift hits both alike
                        result = bench.fault_to_exit(scenario, kind == "stock", args.limit, component)
                        faults[name][kind].append(result)
                        print(f"{name} [{kind} {rep + 1}/{args.reps}]: {result}", flush=True)
        kills: dict = {}
        for component in args.components:
            for method in args.start_methods:
                runs = kills[(component, method)] = {"stock": [], "safe top": [], "safe job": []}
                for rep in range(args.reps):
                    for kind, stock, target in (("stock", True, "top"), ("safe top", False, "top"), ("safe job", False, "job")):
                        result = bench.kill_by_method(component, method, target, stock, args.kill_wait)
                        runs[kind].append(result)
                        print(f"kill -9, {component}, {method} [{kind} {rep + 1}/{args.reps}]: {result}", flush=True)
        stops: dict = {}
        for tasks in args.tasks if args.tasks is not None else ([1] if args.quick else [1, 16]):
            for fault, label in (("stop", "DB stopped"), ("sigterm", "SIGTERM")):
                name = f"{label}, {tasks} task(s) running"
                stops[name] = {"stock": [], "safe": []}
                for rep in range(args.reps):
                    for kind in ("stock", "safe"):
                        result = bench.stop_with_tasks(tasks, fault, kind == "stock", args.limit)
                        stops[name][kind].append(result)
                        print(f"{name} [{kind} {rep + 1}/{args.reps}]: {result}", flush=True)
        probes: dict = {}
        for component in [] if args.no_probes else COMPONENTS:
            cli_runs, curl_runs = (3, 100) if args.quick else (10, 300)
            for rep in range(args.reps):
                result = bench.probe_cost(component, cli_runs, curl_runs, 1000)
                probes.setdefault(component, []).append(result)
                print(f"probe cost, {component} [{rep + 1}/{args.reps}]: {result}", flush=True)
        celery: dict = {}
        if not args.no_celery:
            warmup, window, outage = (10, 30, 15) if args.quick else (20, 60, 20)
            for rep in range(args.reps):
                for kind in ("stock", "safe"):
                    result = bench.celery(kind == "stock", warmup, window, outage)
                    celery.setdefault(kind, []).append(result)
                    print(f"celery [{kind} {rep + 1}/{args.reps}]: {result}", flush=True)
        overhead: dict = {}
        if not args.no_overhead:
            import airflow

            rows: dict[str, list] = {}
            samples: dict[str, dict[str, list]] = {}
            for rep in range(args.reps):
                for kind in ("stock", "safe"):
                    stock = kind == "stock"
                    got = samples.setdefault(kind, {})
                    got.setdefault("startup to first heartbeat (s)", []).append(bench.startup(stock))
                    idle = bench.idle(stock, args.idle_window)
                    got.setdefault("idle RSS, scheduler and its parent (MB)", []).append(idle["rss_mb"])
                    got.setdefault(PARENT_RSS, []).append(idle["parent_rss_mb"])
                    got.setdefault("idle CPU of the parent (% of a core)", []).append(idle["parent_pct_core"])
                    got.setdefault("idle CPU (s per minute)", []).append(idle["cpu_s_per_min"])
                    got.setdefault(OURS, []).append(idle["ours_pct_core"])
                    dags, tasks, warmup, window = (10, 5, 5, 20) if args.quick else (50, 20, 15, 60)
                    busy = bench.throughput(stock, dags, tasks, warmup, window)
                    got.setdefault(f"throughput, {dags} DAGs x {tasks} tasks (TIs/s)", []).append(busy["tis_per_s"])
                    got.setdefault("scheduler CPU per 1000 TIs under load (s)", []).append(busy["cpu_s_per_1000"])
                    print(f"overhead [{kind} {rep + 1}/{args.reps}]: {({k: v[-1] for k, v in got.items()})}", flush=True)
            for measure in samples["stock"]:
                rows[measure] = (statistics.median(samples["stock"][measure]), statistics.median(samples["safe"][measure]))
            overhead = {"airflow": airflow.__version__, "rows": rows,
                        "samples": {m: {k: samples[k][m] for k in samples} for m in samples["stock"]}}
        print(report(faults, overhead, args, args.out, stops, probes, celery, kills))
        if faults:
            chart(faults, args.limit, args.out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

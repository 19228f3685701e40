"""Deployment: the Helm overlay, the Dockerfile, supervisord — each proven as far as this machine
allows (no Docker engine, no Kubernetes): real schema, real linter, real venv, real supervisord."""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from harness.deployment import base_env
from harness.procs import SchedulerProcess, TreeWatcher, alive, health_status, stop, wait_for
from safe_scheduler import components, doctor

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "helm" / "values-safe-scheduler.yaml"
BIN = Path(sys.executable).parent


def _overlay() -> dict:
    return yaml.safe_load(OVERLAY.read_text())


def _overlay_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in _overlay()["env"]}


# -- Helm (the rendered chart: test_chart.py) -----------------------------------------------------


def test_overlay_args_and_env_run_the_safe_scheduler(deployment):
    """Run the container's command line as the chart would: bash -c "exec ..." with the env."""
    args = _overlay()["scheduler"]["args"]
    env = dict(deployment.env, **_overlay_env(), PATH=f"{BIN}:{os.environ['PATH']}")
    pod = SchedulerProcess(args, env, deployment.home / "pod.log", deployment.health_port).start()
    deployment.started.append(pod)
    pod.wait_healthy()
    assert "airflow-safe-scheduler" in " ".join(psutil.Process(pod.pid).cmdline())  # bash exec'd it
    # Not while LocalExecutor forks its workers: a SIGTERM then can be lost (README, Limits).
    wait_for(lambda: len(pod.descendants_named("worker")) >= 4, 60, message="the executor's workers")
    pod.signal(signal.SIGTERM)
    assert pod.wait_exit(60) == 0, pod.log()[-4000:]


# -- Docker image ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    done = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "style", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def _dockerfile_final_stage() -> tuple[dict[str, str], str, list[str]]:
    """(ARG defaults, the final stage's install command (shell), its CMD)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    final = text.split("\nFROM ")[-1]
    install = re.search(r"^RUN (.*pip install .*)$", final, flags=re.M).group(1)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, flags=re.M).group(1))
    return defaults, install, cmd


def test_image_smoke(tmp_path):
    """What the image would do, without a Docker engine: build the wheel as stage 1 does, install
    it into a fresh venv with the Dockerfile's own pip line, run the default command."""
    defaults, install, cmd = _dockerfile_final_stage()
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dist), str(REPO)],
                   check=True, timeout=300, capture_output=True)
    venv = tmp_path / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = (install.replace("${AIRFLOW_VERSION}", defaults["AIRFLOW_VERSION"])
               .replace("/opt/airflow/safe-scheduler-constraints", str(REPO / "constraints"))
               .replace("/opt/airflow/safe-scheduler-dist", str(dist)))
    # The image's `python` and `pip` come first on its PATH: here, the venv's.
    done = subprocess.run(["bash", "-c", install], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PATH=f"{venv}/bin:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr[-3000:]

    home = tmp_path / "airflow"
    home.mkdir()
    env = dict(base_env(home), PATH=f"{venv}/bin:/usr/bin:/bin")
    helped = subprocess.run(cmd + ["--help"], env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--shutdown-timeout" in helped.stdout, helped.stderr[-2000:]
    ran = subprocess.run(cmd + ["--num-runs", "1", "--skip-serve-logs"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]



def test_readme_install_lines(tmp_path):
    """The README's install block, line by line, in a fresh venv: the clone (of this checkout's
    HEAD), the wheel, the install with its extras and constraints (for the Python running the
    tests); then every command is there and the PostgreSQL driver imports."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Install\n.*?```sh\n(.*?)```", text, flags=re.S).group(1)
    python = "py%d.%d" % sys.version_info[:2]
    script = block.replace("<this repository>", str(REPO)).replace("py3.12", python)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(["bash", "-euc", script], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PATH=f"{venv}/bin:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in components.names():
        helped = subprocess.run([str(venv / "bin" / f"airflow-safe-{name}"), "--help"], capture_output=True,
                                text=True, timeout=120, env=base_env(tmp_path / "home"))
        assert helped.returncode == 0, (name, helped.stderr[-2000:])
    driver = subprocess.run([str(venv / "bin" / "python"), "-c", "import psycopg2"], capture_output=True, text=True)
    assert driver.returncode == 0, driver.stderr
    # doctor, as patches/README.md runs it: the wheel's own patches with no flag, and the clone's
    # by a relative and a whole path, give one answer (the patches' paths aside).
    clone = tmp_path / "airflow-safe-scheduler"
    answers = []
    for flags in ([], ["--patches", "patches/"], ["--patches", str(clone / "patches")]):
        done = subprocess.run([str(venv / "bin" / "airflow-safe-scheduler"), "doctor", *flags], cwd=clone,
                              capture_output=True, text=True, timeout=120, env=base_env(tmp_path / "home"))
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, (flags, done.stderr[-2000:])
        shipped = venv.glob("lib/python*/site-packages/safe_scheduler/patches")
        text = done.stdout
        for where in [*shipped, clone / "patches"]:
            text = text.replace(str(where.resolve()), "<patches>")
        answers.append((done.returncode, text))
    assert answers[0] == answers[1] == answers[2], answers
    assert "applies" in answers[0][1] or "applied" in answers[0][1], answers[0][1]

# -- supervisord -----------------------------------------------------------------------------------


def _supervisord_conf(deployment, workdir: Path, command: str) -> Path:
    """examples/supervisord.conf, made runnable here: our venv, the test's env, files in workdir."""
    example = configparser.RawConfigParser()
    example.read(REPO / "examples" / "supervisord.conf")
    program = dict(example["program:airflow-scheduler"])
    program["command"] = command
    program["environment"] = ",".join(f'{k}="{v}"' for k, v in deployment.env.items() if '"' not in v and "%" not in v)
    program["stdout_logfile"] = str(workdir / "scheduler.log")
    program.pop("user", None)  # the example runs as `airflow`; here we are whoever runs the tests
    conf = configparser.RawConfigParser()
    conf["supervisord"] = {"logfile": str(workdir / "supervisord.log"), "pidfile": str(workdir / "supervisord.pid"),
                           "nodaemon": "true", "childlogdir": str(workdir)}
    conf["unix_http_server"] = {"file": str(workdir / "supervisor.sock")}
    conf["rpcinterface:supervisor"] = {
        "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"}
    conf["supervisorctl"] = {"serverurl": f"unix://{workdir / 'supervisor.sock'}"}
    conf["program:airflow-scheduler"] = program
    path = workdir / "supervisord.conf"
    with open(path, "w") as handle:
        conf.write(handle)
    return path


def _scheduler_pid(conf: Path) -> int | None:
    done = subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "pid", "airflow-scheduler"],
                          capture_output=True, text=True, timeout=30)
    text = done.stdout.strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _supervise(deployment, test_root: Path, command: str):
    workdir = test_root / f"supervisord-{os.getpid()}-{time.monotonic_ns()}"
    workdir.mkdir()
    conf = _supervisord_conf(deployment, workdir, command)
    supervisord = subprocess.Popen([str(BIN / "supervisord"), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return conf, supervisord, TreeWatcher(supervisord.pid)


def _stop_supervisord(supervisord: subprocess.Popen, tree: TreeWatcher) -> None:
    stop(supervisord, 90)  # supervisord stops its program first
    tree.kill_survivors()


def _first_scheduler(conf: Path, deployment) -> int:
    first = wait_for(lambda: _scheduler_pid(conf), 60, message="supervisord to start the scheduler")
    wait_for(lambda: health_status(deployment.health_port) == 200, 120, interval=0.5,
             message="the first scheduler's heartbeat")
    return first


def _respawned(conf, first: int) -> int | None:
    """The pid supervisord now runs, once it is not ``first``."""
    pid = _scheduler_pid(conf)
    return pid if pid and pid != first else None


@pytest.mark.all_versions
def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (it may end between two looks: no race with the lookup)."""
    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


def test_supervisord_respawns_the_safe_scheduler_when_the_db_goes_away(deployment, postgres, test_root):
    conf, supervisord, tree = _supervise(deployment, test_root, str(BIN / "airflow-safe-scheduler"))
    try:
        first = _first_scheduler(conf, deployment)
        postgres.stop("immediate")
        wait_for(lambda: _gone(first), 60,
                 message="the first scheduler to exit")
        respawned = wait_for(lambda: _respawned(conf, first), 60, interval=0.3, message="supervisord to respawn it")
        assert respawned != first

        postgres.start()
        back = postgres.execute("SELECT now()")[0][0]
        wait_for(
            lambda: postgres.execute(
                "SELECT count(*) FROM job WHERE job_type = 'SchedulerJob' AND state = 'running' "
                f"AND start_date > '{back.isoformat()}' AND latest_heartbeat > start_date"
            )[0][0],
            180, interval=1, message="a respawned scheduler's job to heartbeat",
        )
        assert _scheduler_pid(conf) not in (None, first)
    finally:
        _stop_supervisord(supervisord, tree)
    assert not tree.survivors()


@pytest.mark.stock
@pytest.mark.all_versions
def test_supervisord_and_stock_scheduler(deployment, postgres, test_root):
    """Documents stock ``airflow scheduler`` under supervisord: where the #32706 zombie path is
    present (2.6.3) the dead scheduler is never respawned — its process never exits."""
    zombie_path = doctor.scheduler_leaks_children_on_error()
    conf, supervisord, tree = _supervise(deployment, test_root, f"{BIN / 'airflow'} scheduler")
    try:
        first = _first_scheduler(conf, deployment)
        postgres.stop("immediate")
        if zombie_path:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert _scheduler_pid(conf) == first, "supervisord respawned stock Airflow: #32706 is gone"
                time.sleep(1)
        else:
            wait_for(lambda: _respawned(conf, first), 60, interval=0.3,
                     message="supervisord to respawn stock airflow scheduler")
    finally:
        _stop_supervisord(supervisord, tree)

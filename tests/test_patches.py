"""patches/: the fix for people who patch Airflow in place, on a throwaway copy of the installed
Airflow package (the installed one is never touched)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.components import LEAKY_LOGGING, started_component
from harness.deployment import PYTHON
from harness.faults import LEAKY_THREAD_PLUGIN, MARGIN, assert_no_orphans, started_stock
from harness.procs import wait_for
from safe_scheduler import doctor

pytestmark = pytest.mark.all_versions

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "patches"
SCHEDULER_COMMAND = Path("airflow", "cli", "commands", "scheduler_command.py")
TRIGGERER_COMMAND = Path("airflow", "cli", "commands", "triggerer_command.py")
PATCHED = (SCHEDULER_COMMAND, TRIGGERER_COMMAND)
#: Seconds Airflow 3's triggerer gives its trigger runner to stop when its job ends.
RUNNER_ESCALATION = 10


def _fitting_patch() -> Path:
    status = doctor.patch_status(PATCHES, doctor.site_packages())
    fitting = [name for name, state in status.items() if state == "applies"]
    assert len(fitting) == 1, f"exactly one patch must fit the installed Airflow: {status}"
    return PATCHES / fitting[0]


def _pristine_copy(tmp_path: Path) -> Path:
    """A copy of the installed ``airflow`` package; first on PYTHONPATH, it is what runs."""
    copy = tmp_path / "site"
    copy.mkdir()
    shutil.copytree(doctor.site_packages() / "airflow", copy / "airflow", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _patch(patch: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["patch", "-p1", "--force", "-d", str(target), "-i", str(patch), *extra],
                          capture_output=True, text=True, timeout=60)


def test_patch_applies_cleanly_and_reverses(tmp_path):
    patch = _fitting_patch()
    copy = _pristine_copy(tmp_path)
    originals = {}
    for path in PATCHED:
        originals[path] = tmp_path / path.name
        shutil.copy(copy / path, originals[path])

    dry = _patch(patch, copy, "--dry-run")
    assert dry.returncode == 0 and "FAILED" not in dry.stdout and "fuzz" not in dry.stdout, dry.stdout
    applied = _patch(patch, copy)
    assert applied.returncode == 0 and "fuzz" not in applied.stdout and "offset" not in applied.stdout, applied.stdout
    for path in PATCHED:
        compiled = subprocess.run([sys.executable, "-m", "py_compile", str(copy / path)], capture_output=True, text=True)
        assert compiled.returncode == 0, compiled.stderr
        assert not filecmp.cmp(originals[path], copy / path, shallow=False), f"{path} not patched"

    assert _patch(patch, copy, "-R", "--dry-run").returncode == 0
    assert _patch(patch, copy, "-R").returncode == 0
    for path in PATCHED:
        assert filecmp.cmp(originals[path], copy / path, shallow=False)


def test_doctor_reports_the_zombie_paths_and_the_fitting_patch(tmp_path):
    patch = _fitting_patch()
    copy = _pristine_copy(tmp_path)
    env = {"PYTHONPATH": str(copy), "AIRFLOW_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    before = subprocess.run([PYTHON, "-m", "safe_scheduler", "doctor", "--patches", str(PATCHES)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert before.returncode == 1, before.stdout + before.stderr
    assert f"{patch.name}: applies" in before.stdout and "PRESENT" in before.stdout

    assert _patch(patch, copy).returncode == 0
    after = subprocess.run([PYTHON, "-m", "safe_scheduler", "doctor", "--patches", str(PATCHES)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stdout + after.stderr
    assert f"{patch.name}: applied" in after.stdout and "PRESENT" not in after.stdout


def test_patched_stock_scheduler_exits_where_unpatched_hangs(deployment, postgres, tmp_path):
    """Stock ``airflow scheduler``, patched: DB stopped, with a plugin's non-daemon thread (which
    keeps every unpatched release alive, see test_faults): it exits non-zero within the deadline."""
    copy = _pristine_copy(tmp_path)
    assert _patch(_fitting_patch(), copy).returncode == 0
    deployment.add_plugin("leaky_thread", LEAKY_THREAD_PLUGIN)
    scheduler = started_stock(deployment, PYTHONPATH=str(copy), AIRFLOW__SAFE_SCHEDULER__SHUTDOWN_TIMEOUT="10")
    wait_for(lambda: scheduler.listening_on(deployment.log_port), 60, message="serve-logs to listen")

    postgres.stop("immediate")
    fault = time.monotonic()
    code = scheduler.wait_exit(10 + MARGIN + 20)
    assert code not in (None, 0), scheduler.log()[-4000:]
    assert scheduler.exited_at - fault < 10 + MARGIN
    assert "most recent call first" in scheduler.log()  # faulthandler's stack dump at the deadline
    assert_no_orphans(scheduler)


def test_patched_stock_triggerer_exits_where_unpatched_hangs(deployment, postgres, tmp_path):
    """Stock ``airflow triggerer``, patched: DB stopped with a log-shipping handler's non-daemon
    thread (which keeps every unpatched release alive, see test_components): it exits in time."""
    copy = _pristine_copy(tmp_path)
    assert _patch(_fitting_patch(), copy).returncode == 0
    (deployment.home / "config" / "leaky_logging.py").write_text(textwrap.dedent(LEAKY_LOGGING))
    triggerer = started_component(
        deployment, postgres, "triggerer", stock=True, PYTHONPATH=str(copy),
        AIRFLOW__SAFE_SCHEDULER__SHUTDOWN_TIMEOUT="10", AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS="leaky_logging.LOGGING_CONFIG",
    )

    postgres.stop("immediate")
    fault = time.monotonic()
    code = triggerer.wait_exit(10 + RUNNER_ESCALATION + MARGIN + 20)
    assert code not in (None, 0), triggerer.log()[-4000:]
    # The patch bounds the exit once the job has ended; on 3.x the job's own end first gives its
    # trigger runner up to 10 s (``kill(escalation_delay=10)``), which the patch leaves alone.
    assert triggerer.exited_at - fault < 10 + RUNNER_ESCALATION + MARGIN
    assert "most recent call first" in triggerer.log()  # faulthandler's stack dump at the deadline
    assert_no_orphans(triggerer)


def test_doctor_reads_a_relative_patches_path_as_it_reads_the_whole_one():
    """``--patches patches/`` (what patches/README.md says) once gave "does not fit" for every
    patch: ``patch -d`` changes directory before it opens ``-i``."""
    runs = [subprocess.run([PYTHON, "-m", "safe_scheduler", "doctor", "--patches", path], cwd=REPO,
                           capture_output=True, text=True, timeout=120) for path in ("patches/", str(PATCHES))]
    assert runs[0].returncode == runs[1].returncode and runs[0].stdout == runs[1].stdout, runs
    assert "applies" in runs[0].stdout or "applied" in runs[0].stdout, runs[0].stdout

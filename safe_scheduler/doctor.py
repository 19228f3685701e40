"""``airflow-safe-scheduler doctor``: does the installed Airflow need a patch, and which one fits?

For teams that patch Airflow in place instead of running our command (``patches/README.md``).
Reports the Airflow version, whether the known zombie paths are in its scheduler command, and
which patch in ``patches/`` applies cleanly (``patch --dry-run``) or is already applied; and the
Celery provider's worker, which no patch covers.
Exit code 0: nothing to do (patched); 1: the zombie paths are there; 2: bad usage.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

#: Where the patches live: inside the package, so that a wheel install has them too (a checkout's
#: ``patches/`` is a link to them).
DEFAULT_PATCHES = Path(__file__).resolve().parent / "patches"


def site_packages() -> Path:
    """The directory that holds the ``airflow`` package: ``patch -p1 -d`` applies there."""
    import airflow

    return Path(airflow.__file__).resolve().parent.parent


def scheduler_leaks_children_on_error() -> bool:
    """Whether the installed ``airflow scheduler`` has the zombie path of Airflow #32706.

    There, ``_serve_logs``/``_serve_health_check`` stop their child only after a clean ``yield``
    (no ``try/finally``): an exception in the scheduler leaves the child running, and
    ``multiprocessing`` joins it forever at interpreter exit.
    """
    from airflow.cli.commands import scheduler_command

    return "finally" not in inspect.getsource(scheduler_command._serve_logs)


def zombie_paths() -> dict[str, bool]:
    """Each known path to a scheduler or triggerer that is dead but never exits: True where present."""
    from airflow.cli.commands import scheduler_command, triggerer_command

    source = inspect.getsource(scheduler_command)
    serve_logs = inspect.getsource(scheduler_command._serve_logs)
    triggerer = inspect.getsource(triggerer_command)
    trigger_logs = inspect.getsource(triggerer_command._serve_logs)
    return {
        "scheduler: children stopped only after a clean exit, not in try/finally (#32706)":
            scheduler_leaks_children_on_error(),
        "scheduler: children only terminate()d: no timeout, no kill of their process tree": "_stop_child" not in serve_logs,
        "scheduler: no bound on the exit once the job has ended": "dump_traceback_later" not in source,
        "triggerer: serve-logs only terminate()d: no timeout, no kill of its process tree": "_stop_child" not in trigger_logs,
        "triggerer: no bound on the exit once the job has ended": "_bound_exit" not in triggerer,
    }


def worker_paths() -> dict[str, bool]:
    """The Celery provider's ``airflow celery worker``, if installed: the same zombie shape, and broker
    connections that can go silent for ever. No patch covers the provider (it is released on its
    own); ``airflow-safe-celery-worker`` does, so these are reported, not counted in the exit code."""
    try:
        from airflow.providers.celery.cli import celery_command
    except ImportError:
        return {}
    serve_logs = inspect.getsource(celery_command._serve_logs)
    try:
        from airflow.configuration import conf

        options = conf.getsection("celery_broker_transport_options") or {}
    except Exception:  # noqa: BLE001 - a config we cannot read says nothing about timeouts
        options = {}
    return {
        "celery worker: serve-logs only terminate()d: no timeout, no kill of its process tree (#32706's shape)":
            "finally" in serve_logs and "_stop_child" not in serve_logs,
        "celery worker: broker sockets without a timeout: a silent connection stops consumption for ever":
            "socket_timeout" not in options,
    }


def _patch(patch_file: Path, target: Path, *extra: str) -> bool:
    done = subprocess.run(
        ["patch", "-p1", "--dry-run", "--force", "--silent", "-d", str(target), "-i", str(patch_file), *extra],
        capture_output=True, text=True,
    )
    return done.returncode == 0


def patch_status(patches: Path, target: Path) -> dict[str, str]:
    """For every patch file: "applies", "applied" (reverses cleanly) or "does not fit"."""
    status = {}
    for patch_file in sorted(patches.glob("airflow-*.patch")):
        if _patch(patch_file, target, "-R"):
            status[patch_file.name] = "applied"
        elif _patch(patch_file, target):
            status[patch_file.name] = "applies"
        else:
            status[patch_file.name] = "does not fit"
    return status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="airflow-safe-scheduler doctor",
        description="Does the installed Airflow need a patch, and which one fits? Lists the known zombie "
        "paths in its scheduler and triggerer commands (and the Celery provider's worker, which no patch "
        "covers) and which patch in patches/ applies or is applied.",
        epilog="Exit codes: 0 nothing to do (no zombie path, or patched); 1 a zombie path is there (a patch "
        "is named if one fits, else run the safe commands instead); 2 bad usage.",
    )
    parser.add_argument("--patches", type=Path, default=DEFAULT_PATCHES,
                        help=f"directory with the airflow-*.patch files (default: {DEFAULT_PATCHES})")
    args = parser.parse_args(argv)

    import airflow

    target = site_packages()
    print(f"Apache Airflow {airflow.__version__} in {target}")
    paths = zombie_paths()
    for description, present in paths.items():
        print(f"  {'PRESENT' if present else 'fixed  '}  {description}")
    needs_patch = any(paths.values())
    worker = worker_paths()
    for description, present in worker.items():
        print(f"  {'stock  ' if present else 'fixed  '}  {description}")
    if any(worker.values()):
        print("  (no patch covers the Celery provider: run airflow-safe-celery-worker in place of "
              "'airflow celery worker')")

    if shutil.which("patch") is None:
        print("cannot check the patches: the 'patch' command is not installed", file=sys.stderr)
        return 1 if needs_patch else 0
    # Absolute: ``patch -d`` changes directory before it opens ``-i``, so a relative path would be
    # looked for inside site-packages ("does not fit" for every patch).
    args.patches = args.patches.resolve()
    if not args.patches.is_dir():
        print(f"no patches directory at {args.patches}; pass --patches DIR", file=sys.stderr)
        return 1 if needs_patch else 0
    status = patch_status(args.patches, target)
    fitting = [name for name, state in status.items() if state == "applies"]
    applied = [name for name, state in status.items() if state == "applied"]
    for name, state in status.items():
        print(f"  {name}: {state}")
    if applied:
        print(f"Patched with {applied[0]}.")
    elif needs_patch and fitting:
        print(f"Needs a patch: {fitting[0]}:\n  patch -p1 -d {target} -i {args.patches / fitting[0]}")
    elif needs_patch:
        print("Needs a patch, and none of ours fits this release: run airflow-safe-scheduler instead.")
    else:
        print("Nothing to do: the known zombie paths are not there.")
    return 1 if needs_patch else 0

"""The console scripts' entry points. Before anything heavy is imported, decide what this process
is: ``doctor`` (no job), the tiny parent (``reaper``: the standard library only), or the job
process (``cli``)."""

from __future__ import annotations

import sys
from typing import NoReturn


def _main(name: str) -> NoReturn:
    argv = sys.argv[1:]
    if argv[:1] == ["doctor"]:
        from safe_scheduler import doctor

        sys.exit(doctor.main(argv[1:]))
    from safe_scheduler import reaper

    if reaper.wanted(argv):
        reaper.run(name, argv)
    from safe_scheduler import cli

    cli.main(argv, name)


def scheduler() -> NoReturn:
    _main("scheduler")


def triggerer() -> NoReturn:
    _main("triggerer")


def dag_processor() -> NoReturn:
    _main("dag-processor")


def celery_worker() -> NoReturn:
    _main("celery-worker")


if __name__ == "__main__":  # python -m safe_scheduler.entry <component> [flags]: how the parent runs the job
    name = sys.argv.pop(1)
    _main(name)

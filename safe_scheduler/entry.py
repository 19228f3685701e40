"""The console scripts' entry points: before anything heavy is imported, decide whether this process
is the tiny parent (``reaper``: the standard library only) or the job process (``cli``)."""

from __future__ import annotations

import sys
from typing import NoReturn


def _main(name: str) -> NoReturn:
    from safe_scheduler import reaper

    argv = sys.argv[1:]
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


if __name__ == "__main__":  # python -m safe_scheduler.entry <component> [flags]: how the parent runs the job
    name = sys.argv.pop(1)
    _main(name)

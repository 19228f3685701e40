"""The console scripts' entry points. Before anything heavy is imported, decide what this process
is: ``doctor`` (no job), the tiny parent (``children.parent``: the standard library only), or the
job process (``startup.cli``).

Each console script names a function of this module after its component's key
(``safe_scheduler.entry:dag_processor``); the function is made here on first use, so that a new
component needs no edit in this file.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not from typing: the parent, which starts here, keeps what it imports
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


def main(name: str) -> NoReturn:
    argv = sys.argv[1:]
    if argv[:1] == ["doctor"]:
        from safe_scheduler import doctor

        sys.exit(doctor.main(argv[1:]))
    from safe_scheduler.children import parent

    if parent.wanted(argv):
        parent.run(name, argv)
    from safe_scheduler.startup import cli

    cli.main(argv, name)


def __getattr__(key: str) -> Callable[[], NoReturn]:
    """``entry.<key>``: the console script of the component with that key (module ``__getattr__``)."""
    if key.startswith("_") or not key.isidentifier():
        raise AttributeError(key)
    name = key.replace("_", "-")
    return lambda: main(name)


if __name__ == "__main__":  # python -m safe_scheduler.entry <component> [flags]: how the parent runs the job
    main(sys.argv.pop(1))

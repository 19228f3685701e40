"""Running a command's ``--help`` or bad input, and reading the flags its help lists."""

from __future__ import annotations

import re
import subprocess

#: The flags ``airflow-safe-<component>`` adds to the stock command's (each names its setting).
OUR_FLAGS = {
    "--shutdown-timeout", "--child-stop-timeout", "--stall-timeout", "--task-drain-timeout",
    "--task-cleanup-timeout", "--orphaned-task-timeout", "--db-wait-timeout", "--version",
}


#: Stock flags ours parses (to refuse them with one line) but does not offer: hot reload.
HIDDEN_FLAGS = {"-d", "--dev"}


def flags_of(help_text: str) -> set[str]:
    """The flags of the options listing: lines that start with a flag, up to their description."""
    flags = set()
    for line in help_text.splitlines():
        if re.match(r"^ {2}-", line):
            names = re.split(r" {2,}", line.strip())[0]
            flags.update(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", names))
    return flags


def run(cmd, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def refused(result: subprocess.CompletedProcess, prog: str = "airflow-safe-scheduler") -> str:
    """The one line of a refusal (exit 2, no traceback), asserted as such."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]

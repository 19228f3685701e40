"""The documentation: the README stays one screen, the site under ``docs/`` builds strictly (a
broken link fails it), and the README's Airflow 3 family block asks for what the demo sets."""

from __future__ import annotations

import re
import shutil
import subprocess

from harness.chart import REPO, tool

README = REPO / "README.md"


def _build(root) -> subprocess.CompletedProcess:
    return subprocess.run([tool("mkdocs"), "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d",
                           str(root / "site")], capture_output=True, text=True, timeout=120)


def test_the_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(REPO / "mkdocs.yml", good)
    shutil.copytree(REPO / "docs", good / "docs")
    built = _build(good)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (good / "site" / "kills" / "index.html").exists()
    with (good / "docs" / "limits.md").open("a") as page:
        page.write("\nSee [the missing page](no-such-page.md).\n")
    broken = _build(good)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr, broken.stderr[-3000:]


def test_the_readme_is_one_screen_and_names_pages_that_exist():
    text = README.read_text()
    assert len(text.encode()) < 15_000
    named = set(re.findall(r"`(docs/[\w./-]+\.md)`", text))
    assert named and all((REPO / page).is_file() for page in named), named


def test_the_family_block_sets_what_the_demo_sets():
    """The README's minimal Airflow 3 family: every variable it exports, the demo's family has."""
    block = re.search(r"## A minimal Airflow 3 family.*?```sh\n(.*?)```", README.read_text(), flags=re.S).group(1)
    exported = set(re.findall(r"^export (AIRFLOW__\w+)=", block, flags=re.M))
    demo = (REPO / "scripts" / "demo.py").read_text()
    # The demo leaves the database and the executor at Airflow's defaults (SQLite, LocalExecutor there).
    assert exported - {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__EXECUTOR"} <= set(
        re.findall(r"\b(AIRFLOW__\w+)=", demo)), exported
    assert {"airflow-safe-api-server", "airflow-safe-scheduler", "airflow-safe-dag-processor",
            "airflow-safe-triggerer"} <= set(re.findall(r"airflow-safe-[\w-]+", block))

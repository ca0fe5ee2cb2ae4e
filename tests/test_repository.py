"""Repository hygiene that the README's promises depend on."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files():
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [path for path in listing.stdout.splitlines() if path.endswith((".py", ".md", ".toml", ".txt"))
            or os.path.basename(path) in ("Makefile", "run")]


def test_no_merge_conflict_markers():
    marker = re.compile(r"^(<<<<<<< |>>>>>>> |=======$)", re.M)
    offenders = []
    for path in _tracked_files():
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            if marker.search(f.read()):
                offenders.append(path)
    assert offenders == []


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "make test" in readme
    assert re.search(r"^make test$", ci, re.M)

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = "requirements/lock-linux-py311.txt"


def _env_pip():
    """The entries of environment.yml's `- pip:` section."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    entries = []
    for line in lines[start + 1:]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if len(line) - len(line.lstrip()) <= indent:
            break
        entries.append(line.strip()[2:].strip() if line.strip().startswith("- ") else line.strip())
    return entries


def test_environment_yml_installs_the_lock_and_the_package():
    """conda's pip installs the tested set and then persviz with its test extra; nothing else, so that the
    package list lives in pyproject.toml (loose) and the lock (pinned) only."""
    assert _env_pip() == [f"-r {LOCK}", "-e .[test]"]
    assert (ROOT / LOCK).is_file()


def test_environment_yml_python_matches_the_lock():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*python=3\.11\s*$", text, re.M), "the lock is resolved for Python 3.11"
    assert "py311" in LOCK


def test_no_hard_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [r for r in project["dependencies"] if "==" in r]


def test_the_ci_script_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"<!-- test-command -->\s*```(?:bash)?\n(.+?)\n```", readme, re.S).group(1).strip()
    assert cmd in ci

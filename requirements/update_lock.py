"""Regenerate ``requirements/lock-linux-py311.txt`` from pyproject.toml's dependencies (Linux x86-64, Python 3.11).

Run from the repository root: ``python requirements/update_lock.py`` (needs ``uv``: ``pip install uv``).
The lock's first line records a hash of pyproject's dependency lists; ``tests/floor/test_install.py`` fails when
pyproject changed and the lock was not regenerated. The current lock's pins are kept where they still satisfy
pyproject (uv's preference for an existing output file); delete the lock first to move every pin to the newest. Where pip on this machine applies a global constraints file
(``pip config get global.constraint``), the lock is resolved within it, so that pip can install what was locked.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-linux-py311.txt"
HEADER = "# pyproject-dependencies-sha256: "


def dependency_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """sha256 of pyproject's runtime and optional dependency lists (order kept, whitespace ignored)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = {"dependencies": [d.replace(" ", "") for d in project["dependencies"]],
            "optional": {k: [d.replace(" ", "") for d in v]
                         for k, v in sorted(project.get("optional-dependencies", {}).items())},
            "requires-python": project.get("requires-python", "")}
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()


def recorded_hash(lock: Path = LOCK) -> str | None:
    """The hash written on the lock's first line, or None when the lock has none."""
    first = lock.read_text().splitlines()[0] if lock.exists() else ""
    return first[len(HEADER):].strip() if first.startswith(HEADER) else None


def _machine_constraints() -> list[str]:
    """pip's configured constraints files on this machine, if any (the lock must satisfy them)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    files = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith(".constraint"):
            files += [p for p in value.strip().strip("'\"").split() if Path(p).is_file()]
    return files


def main() -> None:
    cmd = ["uv", "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "test", "--python-version", "3.11",
           "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--annotation-style", "line", "--quiet"]
    for c in _machine_constraints():
        cmd += ["-c", c]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lock.txt"
        if LOCK.exists():  # uv keeps an existing output file's pins where they still satisfy pyproject
            out.write_text(LOCK.read_text())
        subprocess.run(cmd + ["-o", str(out)], check=True)
        body = out.read_text()
    text = (f"{HEADER}{dependency_hash()}\n"
            "# The tested set for Linux x86-64 / Python 3.11. Regenerate: python requirements/update_lock.py\n"
            + body)
    tmp_lock = LOCK.with_suffix(".tmp")
    tmp_lock.write_text(text)
    tmp_lock.replace(LOCK)
    print(f"wrote {LOCK.relative_to(ROOT)} ({sum(1 for l in body.splitlines() if '==' in l)} pins)")


if __name__ == "__main__":
    main()

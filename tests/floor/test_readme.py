"""The README's Python snippets use imports that exist, and the commands it names are the ``persviz`` command's."""
from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from persviz.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _snippet_imports() -> list[tuple[str, str]]:
    """(module, name) of every `from X import Y` in the README's python blocks."""
    out = []
    for block in re.findall(r"```python\n(.+?)```", README, re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                out += [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                out += [(a.name, "") for a in node.names]
    return out


def test_the_readme_has_python_snippets():
    assert len(_snippet_imports()) >= 10


@pytest.mark.parametrize("module,name", _snippet_imports())
def test_every_readme_import_resolves(module, name):
    mod = importlib.import_module(module)
    assert not name or hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


def _persviz_commands() -> list[list[str]]:
    cmds = []
    for block in re.findall(r"```bash\n(.+?)```", README, re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0])
                words = [w for w in words if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
                if words and words[0].endswith("bin/persviz") or (words and words[0] == "persviz"):
                    cmds.append(words[1:])
    return cmds


def test_the_readme_names_persviz_commands():
    assert len(_persviz_commands()) >= 8


@pytest.mark.parametrize("argv", _persviz_commands(), ids=" ".join)
def test_every_readme_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.run)


def test_the_package_version_is_pyproject_s():
    import tomllib

    import persviz
    assert persviz.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == "0.2.0"

"""Imports sit at the top of persviz's modules.

Walks every module of persviz/ with ast and fails listing every import inside a function (or a method) of a persviz
module or a third-party module that has no comment on its line. One that must stay there says why on that line:
``# heavy: diffusers`` (a large library a module loads only when that function runs), ``# cycle: a <-> b``,
``# optional: ...``. Standard-library imports are not checked here (they belong at the top too).

One folder is exempt by design: the door's command modules, ``persviz/commands/`` (``COMMANDS``). A command imports
the library modules it runs inside its function, so that building the parser (``persviz --help``, ``persviz CMD
--help``) imports none of them and each command loads only what it uses: there every library import is a function
import for the same reason, and a comment on each would say nothing. The other half of that rule, that their
top-level imports stay light, is a behaviour: tests/door/test_fast_cli.py checks that building the parser and every
subcommand's --help import no torch.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "persviz"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
COMMANDS = PACKAGE / "commands"  # the door's command modules: imports inside functions by design (see above)


def commented_lines(source: str) -> set[int]:
    """Line numbers that hold a comment (a real one: '#' inside a string does not count)."""
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return ["persviz" if node.level else (node.module or "")]  # a relative import is a persviz one
    return [a.name for a in node.names]


def function_imports(path: Path) -> list[str]:
    """'file:line: import text' of every uncommented function-level import of persviz or a third-party module."""
    source = path.read_text(encoding="utf-8")
    comments = commented_lines(source)
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source, str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if all(m.split(".")[0] in STDLIB for m in imported_modules(node)):
                continue
            if not comments & set(range(node.lineno, (node.end_lineno or node.lineno) + 1)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return sorted(set(found))


def test_function_level_imports_say_why():
    bad = [line for path in sorted(PACKAGE.rglob("*.py")) if not path.is_relative_to(COMMANDS)
           for line in function_imports(path)]
    assert not bad, ("imports inside functions without a comment saying why (move them to the top of the module, "
                     "or add '# heavy: <library>' / '# cycle: a <-> b' on the line):\n" + "\n".join(bad))


def test_the_check_sees_function_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import numpy\n\ndef f():\n    import json\n    from persviz import io\n"
                 "    import torch  # heavy: torch\n    s = '# not a comment'; import scipy\n"
                 "    class C:\n        def g(self):\n            from . import x\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        got = function_imports(f)
    finally:
        ROOT = old
    assert [g.split(":")[1] for g in got] == ["10", "5", "7"]


def test_the_exempt_folder_is_the_door_s_command_modules():
    """The exemption points at the command modules' package (renamed, it must be renamed here too)."""
    assert (COMMANDS / "__init__.py").is_file() and (COMMANDS / "common.py").is_file()

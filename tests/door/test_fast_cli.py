"""The command line starts fast: building the parser and every subcommand's --help import no torch (nor diffusers,
transformers), and the help texts read from the library's source files are the library's own docstrings."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from persviz.cli import build_parser
from persviz.commands import common

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers")

# Every (sub)command whose description is a library docstring: (module, function or None).
DESCRIPTIONS = {
    ("notebooks",): ("persviz.run_notebooks", None),
    ("train",): ("persviz.trainers.concept_runs", None),
    ("adopt",): ("persviz.foreign_runs", None),
    ("study",): ("persviz.tea.concept_study", None),
    ("sweep",): ("persviz.tea.sweep", None),
    ("pick",): ("persviz.tea.pick", None),
    ("repair",): ("persviz.tea.repair", None),
    ("shapesworld", "train"): ("persviz.shapesworld.train", None),
    ("shapesworld", "evaluate"): ("persviz.shapesworld.evaluate", None),
    ("tea", "runs"): ("persviz.tea.shapesworld_runs", None),
    ("tea", "attention"): ("persviz.tea.attention_study", None),
    ("finexl", "explain"): ("persviz.finexl.model_pair", None),
    ("finexl", "calibrate"): ("persviz.finexl.calibrate", None),
    ("pigeon", "train"): ("persviz.pigeon.train", None),
    ("pigeon", "study"): ("persviz.pigeon.study", "comparison_table"),
    ("pigeon", "control"): ("persviz.pigeon.control", None),
    ("inspect",): ("persviz.tea.inspect_file", None),
    ("fix",): ("persviz.tea.fix_file", None),
    ("doctor",): ("persviz.doctor", None),
}


def python(code: str) -> str:
    """stdout of `python -c code` run from the repository (this checkout's persviz)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=300).stdout.strip()


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """{command path: parser} of every subcommand under `parser`."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[path + (name,)] = sub
                out.update(subparsers(sub, path + (name,)))
    return out


def test_building_the_parser_imports_no_torch():
    assert python("import persviz.cli, sys; persviz.cli.build_parser(); print('torch' in sys.modules)") == "False"


def test_every_help_imports_no_torch_and_prints_its_usage():
    """`persviz --help` and `persviz CMD [ACTION] --help` for every subcommand, through main(), in one process."""
    code = f"""
import contextlib, io, json, sys
import persviz.cli
from tests.door.test_fast_cli import subparsers
paths = [()] + sorted(subparsers(persviz.cli.build_parser()))
usages = {{}}
for path in paths:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            persviz.cli.main([*path, "--help"])
        except SystemExit as e:
            assert e.code == 0, (path, e.code)
    usages[" ".join(path)] = out.getvalue().startswith("usage: persviz")
print(json.dumps({{"usages": usages, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    got = json.loads(python(code))
    assert len(got["usages"]) == 1 + len(subparsers(build_parser())) >= 20
    assert all(got["usages"].values()), got["usages"]
    assert got["heavy"] == []


@pytest.mark.parametrize("path", sorted(DESCRIPTIONS), ids=" ".join)
def test_a_description_is_the_library_docstring(path):
    module, function = DESCRIPTIONS[path]
    obj = importlib.import_module(module)
    expected = getattr(obj, function).__doc__ if function else obj.__doc__
    parser = subparsers(build_parser())[path]
    assert expected and parser.description == expected


def test_the_subcommands_with_a_docstring_are_all_checked():
    """No subcommand's long description escapes the test above (a new one must be added to DESCRIPTIONS)."""
    described = {path for path, p in subparsers(build_parser()).items() if p.description}
    assert described == set(DESCRIPTIONS)


def test_the_docstring_reader_takes_what_python_takes(tmp_path, monkeypatch):
    """A comment and blank lines before the docstring, an r-string with escapes, a function's indented docstring,
    a module without one; checked against the modules' __doc__ after importing them."""
    pkg = tmp_path / "persviz"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "__init__.py").write_text('"""The package."""\n')
    (pkg / "a.py").write_text('# -*- coding: utf-8 -*-\n\n\nr"""Line one \\\\n.\n\n    indented\n"""\nimport os\n\n\n'
                              'def f():\n    """F does.\n\n    Really.\n    """\n')
    (pkg / "b.py").write_text("from __future__ import annotations\nX = 'not a docstring'\n")
    monkeypatch.setattr(common, "PACKAGE", pkg)
    namespace: dict = {}
    exec(compile((pkg / "a.py").read_text(), "a.py", "exec"), namespace)
    assert common.doc("persviz.a") == namespace["__doc__"] and "\\n" in namespace["__doc__"]
    assert common.doc("persviz.a", "f") == namespace["f"].__doc__
    assert common.doc("persviz.b") is None
    assert common.doc("persviz.sub") == "The package."
    with pytest.raises(LookupError):
        common.doc("persviz.a", "g")

"""Every figure a shipped notebook draws is named for what it shows: each cell that draws one carries the names in its
metadata (``# %% figure="norm_histogram"``, see persviz.run_notebooks), valid and unique within the notebook.

Which cells draw is read from the source, since running the notebooks takes minutes: a cell draws a figure when it
calls a function that returns a matplotlib Figure, that is any function of persviz's ``plots`` modules annotated
``-> Figure``, matplotlib's ``Figure(...)``, pyplot, or a function the notebook itself defines that calls one of
these. The executed outputs are checked by the runner: a figure without a name is written as ``unnamed_cell<NN>_<k>``
and listed in summary.json, and the full-scale notebook test (tests/fullscale/test_recipe.py) asserts none is."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import jupytext
import pytest

import persviz
from persviz import run_notebooks as rn

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
PY = sorted(NOTEBOOKS.glob("*.py"))
PYPLOT = {"plt", "pyplot"}


def figure_functions() -> set[str]:
    """Names of the functions of persviz's plots modules that return a Figure, and matplotlib's Figure itself."""
    names = {"Figure"}
    for info in pkgutil.walk_packages(persviz.__path__, "persviz."):
        if "plots" not in info.name.rsplit(".", 1)[-1]:
            continue
        for name, f in vars(importlib.import_module(info.name)).items():
            ret = inspect.signature(f).return_annotation if inspect.isfunction(f) else None
            if getattr(ret, "__name__", ret) == "Figure":
                names.add(name)
    return names


FIGURE_FUNCTIONS = figure_functions()


def called(tree: ast.AST) -> set[str]:
    """The names a piece of code calls (`f(...)` and `m.f(...)` both give 'f'), and 'plt' where it uses pyplot."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
        if isinstance(node, ast.Name) and node.id in PYPLOT:
            out.add("plt")
    return out


def parse(source: str) -> ast.Module:
    """A cell's source as Python, its IPython magics (``%matplotlib inline``) commented out."""
    return ast.parse("\n".join("#" + line if line.lstrip().startswith(("%", "!")) else line
                               for line in source.splitlines()))


def drawing_cells(py: Path) -> dict[int, str]:
    """{cell index: its first line} of the code cells whose source draws a figure."""
    cells = jupytext.read(py).cells
    trees = {i: parse(c.source) for i, c in enumerate(cells) if c.cell_type == "code"}
    drawing = FIGURE_FUNCTIONS | {"plt"}
    grew = True
    while grew:  # a function the notebook defines that draws draws too (02's sweep_plot)
        defined = {n.name for t in trees.values() for n in ast.walk(t)
                   if isinstance(n, ast.FunctionDef) and called(n) & drawing}
        grew = bool(defined - drawing)
        drawing |= defined
    return {i: cells[i].source.strip().splitlines()[0] for i, t in trees.items() if called(t) & drawing}


def test_the_static_check_finds_persviz_plots(tmp_path):
    assert {"image_grid", "norm_histogram", "word_grid", "decomposition_bars", "mask_overlay", "Figure"} <= (
        FIGURE_FUNCTIONS)
    assert "figure_and_ax" not in FIGURE_FUNCTIONS and "tile_canvas" not in FIGURE_FUNCTIONS  # not Figures
    cells = {"a": "x = image_grid(ims, 1, 2)", "b": "print(1)", "c": "def show(m):\n    return pp.mask_overlay(m)",
             "d": "show(m) if m else None", "e": "fig, ax = plt.subplots()", "f": "%matplotlib inline\ntable(rows)"}
    nb = jupytext.reads("\n".join(f"# %%\n{src}\n" for src in cells.values()), fmt="py:percent")
    path = tmp_path / "nb.py"
    jupytext.write(nb, path, fmt="py:percent")
    assert sorted(drawing_cells(path)) == [0, 2, 3, 4]


@pytest.mark.parametrize("py", PY, ids=[p.stem for p in PY])
def test_every_figure_cell_is_named(py):
    named = rn.check_figure_names(jupytext.read(py), py.name)  # snake_case, unique within the notebook
    missing = {i: first for i, first in drawing_cells(py).items() if i not in named}
    assert not missing, (f"{py.name}: cells that draw a figure without a name (add figure=\"what_it_shows\" to their "
                         f"'# %%' line, then jupytext --sync {py}): {missing}")


def test_the_shipped_notebooks_name_their_figures():
    names = {py.stem: [n for ns in rn.check_figure_names(jupytext.read(py)).values() for n in ns] for py in PY}
    assert all(names.values()), names
    assert "norm_histogram" in names["01_semantic_collapse"]
    assert "semantic_shift_over_steps" in names["01_semantic_collapse"]

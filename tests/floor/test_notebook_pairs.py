"""The notebooks are jupytext pairs: notebooks/NN_name.py (percent format) is the source, NN_name.ipynb its copy.

Each pair must agree cell by cell (source and figure names), and the committed .ipynb carries no outputs and no
execution counts (run `jupytext --sync notebooks/*.py` after editing a .py; `persviz notebooks` writes executed copies
elsewhere)."""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
PY = sorted(NOTEBOOKS.glob("*.py"))
IPYNB = sorted(NOTEBOOKS.glob("*.ipynb"))


def cells(path: Path) -> list[tuple[str, str, object]]:
    """(type, source, figure names) of each cell: the names `persviz notebooks` gives its figures must agree too."""
    return [(c.cell_type, c.source.strip(), c.metadata.get("figure")) for c in jupytext.read(path).cells]


def test_every_notebook_has_its_pair():
    assert PY and IPYNB, f"no notebooks in {NOTEBOOKS}"
    assert {p.stem for p in PY} == {p.stem for p in IPYNB}, (
        f"unpaired: .py only {sorted({p.stem for p in PY} - {p.stem for p in IPYNB})}, "
        f".ipynb only {sorted({p.stem for p in IPYNB} - {p.stem for p in PY})}")


@pytest.mark.parametrize("py", PY, ids=[p.stem for p in PY])
def test_pair_has_the_same_cells(py):
    ipynb = py.with_suffix(".ipynb")
    a, b = cells(py), cells(ipynb)
    assert [t for t, *_ in a] == [t for t, *_ in b], f"{py.name} and {ipynb.name} differ in cell types"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"cell {i} differs between {py.name} and {ipynb.name}: run jupytext --sync {py}"


@pytest.mark.parametrize("py", PY, ids=[p.stem for p in PY])
def test_pair_is_declared_in_the_metadata(py):
    assert py.read_text().startswith("# ---\n# jupyter:\n"), f"{py.name} lacks its jupytext header"
    for path in (py, py.with_suffix(".ipynb")):
        meta = jupytext.read(path).metadata.get("jupytext", {})
        assert meta.get("formats") == "ipynb,py:percent", f"{path.name}: jupytext formats {meta.get('formats')!r}"


@pytest.mark.parametrize("ipynb", IPYNB, ids=[p.stem for p in IPYNB])
def test_committed_notebook_has_no_outputs(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{ipynb.name} has no code cells"
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("outputs")]
    counted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count") is not None]
    assert not with_outputs, f"{ipynb.name}: outputs in cells {with_outputs}"
    assert not counted, f"{ipynb.name}: execution counts in cells {counted}"

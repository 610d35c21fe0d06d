"""The main job's runner: failures are recorded and the rest still run, figures come in every asked format named for
what they show with a provenance sidecar (unnamed ones under a fallback name), writes stay inside the output folder,
Pigeon is left out at full scale with its reason, the --scale flag wins over PERSVIZ_SCALE."""
from __future__ import annotations

import base64
import io
import json
import os

import jupytext
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image

from persviz import run_notebooks as rn
from persviz.cli import main as cli_main
from persviz.errors import OutsideFolderError

FIGURE = """# %% figure="descending_line"
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1], [1, 0]); plt.show()
"""
SCALE = """# %%
import os
print(os.environ["PERSVIZ_SCALE"])
"""
FAILING = """# %%
print("first cell ran")
# %%
raise ValueError("planted failure")
# %%
print("never reached")
"""


def notebook(folder, name, source):
    path = folder / f"{name}.ipynb"
    jupytext.write(jupytext.reads(source, fmt="py:percent"), path)
    return path


def test_a_failure_is_recorded_and_the_rest_still_run(tmp_path):
    bad, good = notebook(tmp_path, "01_bad", FAILING), notebook(tmp_path, "02_good", FIGURE)
    runs = rn.run_all([bad, good], tmp_path / "out")
    assert [(r.name, r.status) for r in runs] == [("01_bad", "failed"), ("02_good", "ok")]
    assert "planted failure" in runs[0].error and "\x1b" not in runs[0].error
    assert rn.exit_code(runs) == 1
    partly = json.loads((tmp_path / "out" / "01_bad.ipynb").read_text())
    outputs = [o for c in partly["cells"] for o in c.get("outputs", [])]
    assert any("first cell ran" in "".join(o.get("text", "")) for o in outputs)
    assert any(o.get("output_type") == "error" and o.get("evalue") == "planted failure" for o in outputs)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["failed", "ok"]
    table = rn.summary_table(runs)
    assert "01_bad" in table and "failed" in table and "02_good" in table


def test_figures_in_every_asked_format_with_provenance(tmp_path):
    runs = rn.run_all([notebook(tmp_path, "fig", FIGURE)], tmp_path / "out", formats=["png", "svg", "pdf"])
    d = tmp_path / "out" / "fig"
    assert sorted(runs[0].figures) == [d / "descending_line.pdf", d / "descending_line.png", d / "descending_line.svg"]
    assert runs[0].unnamed == []
    assert Image.open(d / "descending_line.png").size[0] > 50
    assert (d / "descending_line.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (d / "descending_line.pdf").read_bytes().startswith(b"%PDF")
    record = json.loads((d / "descending_line.json").read_text())
    assert record["scale"] == "shapesworld" and record["notebook"] == "fig.ipynb" and record["cell"] == 0
    assert record["figure"] == "descending_line" and record["named"] is True
    assert record["versions"]["persviz"] == record["persviz"] and record["versions"]["torch"]
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") and len(v) == 64
               for k, v in record["models"].items())
    assert sorted(record["formats"]) == ["pdf", "png", "svg"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(summary["runs"][0]["figures"]) == ["fig/descending_line.pdf", "fig/descending_line.png",
                                                     "fig/descending_line.svg"]
    assert summary["runs"][0]["unnamed"] == []
    assert not (tmp_path / "out" / "figures").exists()


def png(color: str) -> str:
    """A 4x4 PNG of one colour, base64 as an executed notebook holds it."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def figure_output(color: str, svg: bool = False) -> dict:
    """A display_data output as the inline backend writes it: PNG, optionally SVG, and the text fallback."""
    data = {"image/png": png(color), "text/plain": "<Figure size 200x200 with 1 Axes>"}
    if svg:
        data["image/svg+xml"] = f'<svg xmlns="http://www.w3.org/2000/svg"><rect fill="{color}"/></svg>'
    return new_output("display_data", data=data)


def executed() -> nbformat.NotebookNode:
    """An executed notebook by hand: a named figure after a print, a cell naming two figures that draws three, an
    unnamed figure, a cell of text only."""
    return new_notebook(cells=[
        new_markdown_cell("# title"),
        new_code_cell("print(1); norm_histogram(...)", metadata={"figure": "norm_histogram"}, outputs=[
            new_output("stream", name="stdout", text="1\n"), figure_output("red", svg=True)]),
        new_code_cell("three figures", metadata={"figure": ["before_tea", "after_tea"]}, outputs=[
            figure_output("green"), new_output("execute_result", data={"text/plain": "7"}, execution_count=3),
            figure_output("blue"), figure_output("white")]),
        new_code_cell("image_grid(...)", outputs=[new_output("stream", name="stdout", text="x\n"),
                                                  figure_output("black")]),
        new_code_cell("print(2)", outputs=[new_output("stream", name="stdout", text="2\n")]),
    ])


def test_write_figures_names_each_figure_for_its_cell_and_falls_back_when_unnamed(tmp_path):
    out = tmp_path / "out"
    record = {"persviz": "0", "notebook": "01_demo.ipynb"}
    figures, unnamed = rn.write_figures(executed(), "01_demo", out, ["png", "svg"], record)
    d = out / "01_demo"
    assert figures == [d / "norm_histogram.png", d / "norm_histogram.svg", d / "before_tea.png", d / "after_tea.png",
                       d / "unnamed_cell02_3.png", d / "unnamed_cell03_1.png"]
    assert unnamed == [d / "unnamed_cell02_3.png", d / "unnamed_cell03_1.png"]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [p.name for p in figures] + ["norm_histogram.json", "before_tea.json", "after_tea.json",
                                     "unnamed_cell02_3.json", "unnamed_cell03_1.json"])  # no temporary file left
    assert Image.open(d / "norm_histogram.png").getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(d / "after_tea.png").getpixel((0, 0)) == (0, 0, 255)  # the text output between is skipped
    assert Image.open(d / "unnamed_cell03_1.png").getpixel((0, 0)) == (0, 0, 0)
    assert (d / "norm_histogram.svg").read_text().startswith("<svg")
    sidecar = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
    assert sidecar["norm_histogram"] == {**record, "figure": "norm_histogram", "named": True, "cell": 1, "output": 1,
                                         "formats": ["png", "svg"]}
    assert sidecar["before_tea"] == {**record, "figure": "before_tea", "named": True, "cell": 2, "output": 0,
                                     "formats": ["png"]}
    assert sidecar["after_tea"]["output"] == 2
    assert sidecar["unnamed_cell02_3"] == {**record, "figure": "unnamed_cell02_3", "named": False, "cell": 2,
                                           "output": 3, "formats": ["png"]}
    assert sidecar["unnamed_cell03_1"]["named"] is False and sidecar["unnamed_cell03_1"]["cell"] == 3
    run = rn.NotebookRun("01_demo", "ok", 1.0, figures, unnamed=unnamed)
    assert "unnamed figures: unnamed_cell02_3, unnamed_cell03_1" in rn.summary_table([run])


def test_write_figures_refuses_a_link_leading_out_and_writes_nothing_there(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "01_demo").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutsideFolderError, match="leads outside"):
        rn.write_figures(executed(), "01_demo", out, ["png"], {})
    assert list(elsewhere.iterdir()) == []
    os.unlink(out / "01_demo")
    (out / "01_demo").mkdir()
    victim = elsewhere / "kept.png"
    victim.write_bytes(b"not persviz's")
    (out / "01_demo" / "norm_histogram.png").symlink_to(victim)  # a file-level link leading out
    with pytest.raises(OutsideFolderError):  # write_figures confines itself to `out`: no confined block needed
        rn.write_figures(executed(), "01_demo", out, ["png"], {})
    assert victim.read_bytes() == b"not persviz's"


def test_run_all_refuses_a_link_leading_out_before_anything_runs(tmp_path):
    nb, out, elsewhere = notebook(tmp_path, "fig", FIGURE), tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "fig").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutsideFolderError):
        rn.run_all([nb], out)
    assert list(elsewhere.iterdir()) == [] and not (out / "fig.ipynb").exists()


@pytest.mark.parametrize("metadata,message", [
    ([{"figure": "Norm-Histogram"}], "not a snake_case name"),
    ([{"figure": "../escape"}], "not a snake_case name"),
    ([{"figure": "unnamed_cell01_0"}], "starts with 'unnamed_'"),
    ([{"figure": 3}], "not a snake_case name"),
    ([{"figure": "shift"}, {"figure": ["grid", "shift"]}], "given to cell 0 and cell 1"),
])
def test_figure_names_are_checked_before_a_notebook_runs(tmp_path, metadata, message):
    nb = new_notebook(cells=[new_code_cell("1", metadata=m) for m in metadata])
    with pytest.raises(ValueError, match=message):
        rn.check_figure_names(nb, "bad.ipynb")
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(ValueError, match=message):
        rn.run_all([path], tmp_path / "out")
    assert not (tmp_path / "out" / "bad.ipynb").exists()


def test_cell_figure_names_in_jupytext_percent_round_trip(tmp_path):
    src = '# %% figure="norm_histogram"\nx = 1\n\n# %% figure=["before_tea", "after_tea"]\ny = 2\n\n# %%\nz = 3\n'
    nb = jupytext.reads(src, fmt="py:percent")
    assert [rn.cell_figure_names(c) for c in nb.cells] == [["norm_histogram"], ["before_tea", "after_tea"], []]
    assert jupytext.writes(jupytext.reads(jupytext.writes(nb, "ipynb"), "ipynb"), "py:percent").endswith(src)


def test_the_scale_flag_wins_and_pigeon_is_left_out_at_full_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSVIZ_SCALE", "shapesworld")
    folder = tmp_path / "nb"
    folder.mkdir()
    scale, pigeon = notebook(folder, "00_scale", SCALE), notebook(folder, "04_pigeon", FAILING)
    runs = rn.run_all([scale, pigeon], tmp_path / "out", scale="full")
    assert [(r.name, r.status) for r in runs] == [("00_scale", "ok"), ("04_pigeon", "skipped")]
    assert "ShapesWorld only" in runs[1].error and rn.exit_code(runs) == 0
    out = json.loads((tmp_path / "out" / "00_scale.ipynb").read_text())
    assert "full" in "".join(out["cells"][0]["outputs"][0]["text"])
    import os
    assert os.environ["PERSVIZ_SCALE"] == "shapesworld"  # restored after the run


def test_the_command_line_exit_code_and_bad_input(tmp_path):
    good = notebook(tmp_path, "good", SCALE)
    assert cli_main(["notebooks", "--out", str(tmp_path / "o"), str(good)]) == 0
    assert cli_main(["notebooks", "--out", str(tmp_path / "o"), str(notebook(tmp_path, "bad", FAILING))]) == 1
    with pytest.raises(SystemExit, match="unknown figure format"):
        cli_main(["notebooks", "--format", "gif", "--out", str(tmp_path / "o"), str(good)])
    with pytest.raises(SystemExit, match="no such notebook"):
        cli_main(["notebooks", "--out", str(tmp_path / "o"), str(tmp_path / "missing.ipynb")])
    assert not (tmp_path / "o" / "missing.ipynb").exists()

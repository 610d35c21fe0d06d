"""The main job's runner: failures are recorded and the rest still run, figures come in every asked format with a
provenance sidecar, Pigeon is left out at full scale with its reason, the --scale flag wins over PERSVIZ_SCALE."""
from __future__ import annotations

import json

import jupytext
import pytest
from PIL import Image

from persviz import run_notebooks as rn
from persviz.cli import main as cli_main

FIGURE = """# %%
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
    figs = sorted(p.name for p in runs[0].figures)
    assert figs == ["fig_cell00_0.pdf", "fig_cell00_0.png", "fig_cell00_0.svg"]
    d = tmp_path / "out" / "figures"
    assert Image.open(d / "fig_cell00_0.png").size[0] > 50
    assert (d / "fig_cell00_0.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (d / "fig_cell00_0.pdf").read_bytes().startswith(b"%PDF")
    record = json.loads((d / "fig_cell00_0.json").read_text())
    assert record["scale"] == "shapesworld" and record["notebook"] == "fig.ipynb" and record["cell"] == 0
    assert record["versions"]["persviz"] == record["persviz"] and record["versions"]["torch"]
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") and len(v) == 64
               for k, v in record["models"].items())
    assert sorted(record["formats"]) == ["pdf", "png", "svg"]


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

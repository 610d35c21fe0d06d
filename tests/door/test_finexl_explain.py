"""``persviz finexl explain`` sharded: 2 processes through accelerate on the CPU (gloo) give the single-process
pairs and decomposition; a lost cell is the only one a rerun computes; a missing LoRA is refused.

A tiny grid (4 ShapesWorld prompts x 1 seed, 2 sampler steps, 2 prompts per cell) keeps each launch to seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from persviz.cli import main as cli_main
from persviz.shards import CELLS_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRID = ["finexl", "explain", "--lora", "red_100", "--prompts", "4", "--seeds", "1", "--chunk", "2", "--steps", "2",
        "--no-progress"]


def max_difference(a: dict, b: dict) -> float:
    assert a["counts"] == b["counts"] and a["settings"] == b["settings"] and a["methods"].keys() == b["methods"].keys()
    worst = float(np.max(np.abs(np.array(a["v_div"]) - np.array(b["v_div"]))))
    for m in a["methods"]:
        x, y = a["methods"][m], b["methods"][m]
        assert x["names"] == y["names"]
        worst = max(worst, abs(x["relative_residual"] - y["relative_residual"]),
                    *(abs(x["weights"][k] - y["weights"][k]) for k in x["weights"]))
    return worst


def test_explain_on_two_processes_equals_one_and_resumes(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    single = cli_main([*GRID, "--out", str(one)])
    assert single["counts"] == {"probes": 4, "seeds": 1, "pairs": 4, "cells": 2}
    assert set(single["methods"]) == {"finexl", "persviz"} and single["methods"]["persviz"]["sentences"]
    assert json.loads((one / "explain.json").read_text())["v_div"] == single["v_div"]
    assert cli_main([*GRID, "--out", str(two), "--processes", "2", "--threads", "1"]) == 0
    sharded = json.loads((two / "explain.json").read_text())
    diff = max_difference(single, sharded)
    print(f"sharded vs single max |difference| = {diff:.3g}")
    assert diff <= 1e-6

    cells = sorted((two / CELLS_DIR).glob("*.json"))
    assert [p.name for p in cells] == ["prompts0-2.json", "prompts2-4.json"]
    before = {p.name: p.stat().st_mtime_ns for p in cells}
    cells[1].unlink()  # a run killed before this cell was written
    capsys.readouterr()
    resumed = cli_main([*GRID, "--out", str(two)])
    assert "resuming" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (two / CELLS_DIR).glob("*.json")}
    assert [n for n in after if after[n] != before.get(n)] == [cells[1].name]  # only the lost cell ran again
    assert max_difference(single, resumed) <= 1e-6


def test_bad_explain_inputs_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="no_such.*does not exist"):
        cli_main(["finexl", "explain", "--lora", str(tmp_path / "no_such"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--processes must be at least 1"):
        cli_main([*GRID, "--processes", "0", "--out", str(tmp_path / "o")])

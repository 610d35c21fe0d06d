"""``persviz sweep`` and ``persviz study`` sharded: 2 processes through accelerate on the CPU (gloo) give the
single-process result; a lost cell is the only one a rerun computes; a folder of another grid is refused.

Tiny grids (2 prompts x 1 seed, 2 sampler steps) keep each launch to seconds."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from persviz.cli import main as cli_main
from persviz.evaluation import Evaluation
from persviz.paths import DATA_DIR
from persviz.shards import CELLS_DIR
from persviz.tea.sweep import UNTOUCHED

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHECKERS = DATA_DIR / "shapesworld" / "concepts" / "checkers"
GRID = ["--rotations", "0,0.4", "--scales", "0", "--prompts", "2", "--seeds", "1", "--steps", "2", "--chunk", "1",
        "--batch-size", "2", "--no-progress"]


def max_difference(a: Evaluation, b: Evaluation) -> float:
    assert a.conditions == b.conditions
    worst = 0.0
    for c in a.conditions:
        assert a.items[c]["prompt"] == b.items[c]["prompt"] and a.items[c]["seed"] == b.items[c]["seed"]
        for m in a.metrics(c):
            worst = max(worst, float(np.max(np.abs(np.array(a.items[c][m]) - np.array(b.items[c][m])))))
    return worst


def test_sweep_on_two_processes_equals_one_and_resumes(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    single = cli_main(["sweep", str(CHECKERS), *GRID, "--out", str(one)])
    assert single.conditions == [UNTOUCHED, "rotation 0, scale 0", "rotation 0.4, scale 0"]
    assert single.meta["grid"]["rotations"] == [0.0, 0.4] and single.meta["grid"]["scales"] == [0.0]
    assert single.items[UNTOUCHED] == single.items["rotation 0, scale 0"]
    assert single.items["rotation 0.4, scale 0"]["seed"] == [0, 1]  # seeded by the prompt's place, not the cell's
    assert "oracle_context" in single.metrics()
    assert cli_main(["sweep", str(CHECKERS), *GRID, "--out", str(two), "--processes", "2", "--threads", "1"]) == 0
    sharded = Evaluation.load(two / "sweep.json")
    assert max_difference(single, sharded) <= 1e-6
    assert sharded.meta["grid"] == single.meta["grid"]

    cells = sorted((two / CELLS_DIR).glob("*.json"))
    assert len(cells) == 4
    before = {p.name: p.stat().st_mtime_ns for p in cells}
    cells[0].unlink()  # a run killed before this cell was written
    capsys.readouterr()
    resumed = cli_main(["sweep", str(CHECKERS), *GRID, "--out", str(two)])
    assert "resuming" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (two / CELLS_DIR).glob("*.json")}
    assert [n for n in after if after[n] != before.get(n)] == [cells[0].name]  # only the lost cell ran again
    assert max_difference(single, resumed) <= 1e-6

    with pytest.raises(SystemExit, match="holds a different grid.*new --out"):
        cli_main(["sweep", str(CHECKERS), *GRID[:-1], "--steps", "3", "--no-progress", "--out", str(two)])


def test_bad_sweep_inputs_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="rotation must be a number in"):
        cli_main(["sweep", str(CHECKERS), "--rotations", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--processes must be at least 1"):
        cli_main(["sweep", str(CHECKERS), "--processes", "0", "--out", str(tmp_path)])


def numbers(x) -> list:
    """Every number of a nested JSON value, in order (None for null)."""
    if isinstance(x, dict):
        return [n for k in sorted(x) for n in numbers(x[k])]
    if isinstance(x, list):
        return [n for v in x for n in numbers(v)]
    return [x] if x is None or isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_study_on_two_processes_equals_one(tmp_path):
    concept = tmp_path / "checkers"
    keep = {"learned_embeds-steps-1500.safetensors", "learned_embeds-steps-3000.safetensors"}

    def few_snapshots(folder: str, names: list[str]) -> list[str]:  # the tracker then reads 2 snapshots, not 30
        return [n for n in names if n == "study" or n.startswith("learned_embeds-steps-") and n not in keep]
    shutil.copytree(CHECKERS, concept, ignore=few_snapshots)
    args = ["study", str(concept), "--probes", "2", "--every", "1500", "--steps", "2", "--batch-size", "2",
            "--methods", "textual_inversion", "--no-progress"]
    cli_main(args)
    single = json.loads((concept / "study" / "study.json").read_text())
    assert single["images"]["step"] == [0, 1500, 3000] and "textual_inversion TEA" in single["tea_table"]
    shutil.rmtree(concept / "study")
    assert cli_main([*args, "--processes", "2", "--threads", "1"]) == 0
    sharded = json.loads((concept / "study" / "study.json").read_text())
    assert sorted(p.stem for p in (concept / "study" / CELLS_DIR).glob("*.json")) == [
        "impacts_snapshot0", "impacts_snapshot1", "impacts_snapshot2", "tea_textual_inversion", "text"]
    assert sharded.keys() == single.keys() and sharded["tea_table"].keys() == single["tea_table"].keys()
    a, b = numbers(single), numbers(sharded)
    assert len(a) == len(b) and [x is None for x in a] == [x is None for x in b]
    assert max(abs(x - y) for x, y in zip(a, b) if x is not None) <= 1e-6

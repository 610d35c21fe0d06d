"""persviz.shards: cells split over processes, one file per cell, resume, manifest check, idle processes.

The processes are simulated here (a state object with process_index / num_processes, run one after the other, the
main one last); tests/door/test_sweep.py launches real ones through accelerate."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from persviz import shards


@dataclass
class FakeState:
    process_index: int = 0
    num_processes: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        pass


GRID = [shards.cell(rotation=r, scale=s) for r in (0.0, 0.2, 0.4) for s in (0.0, 0.5)]


def compute_into(ran: list):
    def compute(c: dict) -> dict:
        ran.append(c["id"])
        g = torch.Generator().manual_seed(int(c["rotation"] * 10) * 100 + int(c["scale"] * 10))  # seeded by the cell
        return {"x": torch.rand(3, generator=g).tolist()}
    return compute


def run_processes(n: int, folder, ran: list, **kw) -> dict:
    """The grid on n simulated processes: the others first, then the main one, which gathers."""
    for rank in [*range(1, n), 0]:
        out = shards.run_cells(GRID, compute_into(ran), folder, {"steps": 2}, state=FakeState(rank, n),
                               progress=False, **kw)
        assert (out is None) == (rank != 0)
    return out


def test_cell_ids_are_stable_and_checked():
    assert shards.cell(rotation=0.2, scale=0.5)["id"] == "rotation0.2_scale0.5"
    assert shards.cell(prompts=[0, 4])["id"] == "prompts0-4"
    assert shards.cell(part="tea", method="dreambooth")["id"] == "tea_dreambooth"
    with pytest.raises(ValueError, match="share the id"):
        shards.check_cells([{"id": "a"}, {"id": "a"}])
    with pytest.raises(ValueError, match="needs an 'id'"):
        shards.check_cells([{"id": "a/b"}])
    with pytest.raises(ValueError, match="no cell"):
        shards.check_cells([])


def test_sharded_equals_single_and_each_cell_runs_once(tmp_path):
    ran1, ran2 = [], []
    single = run_processes(1, tmp_path / "one", ran1)
    sharded = run_processes(2, tmp_path / "two", ran2)
    assert list(single) == [c["id"] for c in GRID] == list(sharded)
    assert single == sharded
    assert sorted(ran2) == sorted(ran1) == sorted(c["id"] for c in GRID)
    files = sorted(p.stem for p in (tmp_path / "two" / shards.CELLS_DIR).glob("*.json"))
    assert files == sorted(c["id"] for c in GRID)
    assert json.loads((tmp_path / "two" / shards.MANIFEST).read_text())["settings"] == {"steps": 2}


def test_process_i_takes_the_cells_at_i_mod_n(tmp_path):
    ran = []
    shards.run_cells(GRID, compute_into(ran), tmp_path, state=FakeState(1, 4), progress=False)
    assert ran == [GRID[1]["id"], GRID[5]["id"]]


def test_a_killed_run_resumes_with_the_missing_cells_only(tmp_path):
    calls = []

    def dies_at_third(c: dict) -> dict:
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(c["id"])
        return {"x": 1}
    with pytest.raises(RuntimeError, match="killed"):
        shards.run_cells(GRID, dies_at_third, tmp_path, state=FakeState(0, 1), progress=False)
    assert shards.done_cells(tmp_path, GRID) == [GRID[0]["id"], GRID[1]["id"]]
    assert not list((tmp_path / shards.CELLS_DIR).glob(".*.tmp"))  # no half-written file left
    (tmp_path / shards.CELLS_DIR / f"{GRID[0]['id']}.json").unlink()  # and one more lost
    ran = []
    out = shards.run_cells(GRID, compute_into(ran), tmp_path, state=FakeState(0, 1), progress=False)
    assert ran == [GRID[0]["id"]] + [c["id"] for c in GRID[2:]]
    assert out[GRID[1]["id"]] == {"x": 1} and len(out) == len(GRID)


def test_a_folder_of_another_grid_is_refused_or_restarted(tmp_path):
    run_processes(1, tmp_path, [])
    with pytest.raises(ValueError, match="holds a different grid.*use a new --out or delete it"):
        shards.run_cells(GRID[:2], compute_into([]), tmp_path, {"steps": 2}, state=FakeState(), progress=False)
    with pytest.raises(ValueError, match="different grid"):
        shards.run_cells(GRID, compute_into([]), tmp_path, {"steps": 3}, state=FakeState(), progress=False)
    ran = []
    out = shards.run_cells(GRID[:2], compute_into(ran), tmp_path, {"steps": 3}, state=FakeState(), progress=False,
                           on_mismatch="restart")
    assert ran == [c["id"] for c in GRID[:2]] and list(out) == ran


def test_more_processes_than_cells_leaves_the_extra_ones_idle(tmp_path, capsys):
    ran = []
    assert shards.run_cells(GRID[:2], compute_into(ran), tmp_path, state=FakeState(5, 8), progress=False) is None
    assert ran == [] and "process 5 of 8: no cell to compute (2 cells for 8 processes)" in capsys.readouterr().out
    for rank in (1, 0):
        out = shards.run_cells(GRID[:2], compute_into(ran), tmp_path, state=FakeState(rank, 8), progress=False)
    assert list(out) == [c["id"] for c in GRID[:2]]


def test_the_main_process_names_cells_another_process_left_missing(tmp_path):
    with pytest.raises(ValueError, match="1 of 2 cells have no result"):
        shards.run_cells(GRID[:2], compute_into([]), tmp_path, state=FakeState(0, 2), progress=False)


def test_launch_helpers(monkeypatch):
    for k in shards.LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not shards.launched()
    state = shards.process_state()  # unlaunched: one process
    assert state.num_processes == 1 and state.is_main_process
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert shards.launched()
    assert shards.strip_option(["sweep", "--processes", "2", "--out", "x", "--processes=3"], "--processes") == [
        "sweep", "--out", "x"]
    cmd = shards.launch_command(["sweep", "d"], 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-4:] == ["-m", "persviz", "sweep", "d"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    with pytest.raises(ValueError, match="at least 1"):
        shards.launch_command([], 0)

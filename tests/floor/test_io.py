"""persviz.io: atomic writes leave the old file (or folder) whole when the writer raises and no temporary file behind;
JSON is strict (NaN and infinities as null) with numpy/torch values as Python ones. References: the json module,
hand-written expected values."""
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from persviz.errors import DamagedFileError, NotOursError, OutsideFolderError
from persviz.io import (atomic_folder, atomic_path, atomic_save, atomic_write, atomic_write_bytes, atomic_write_text,
                        confined, load_state, make_dir, remove_file, to_jsonable, write_json)
from tests.payloads import Payload


class Boom(Exception):
    pass


def _strict_loads(text):
    """json.loads that refuses the non-standard NaN / Infinity / -Infinity tokens."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_atomic_path_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "result.txt"  # the folder is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and tmp.exists() and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["result.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_atomic_path_keeps_the_old_file_whole_when_the_block_raises(tmp_path, exc):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise exc()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.txt"]


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")

    def writer(p: Path):
        p.write_bytes(b"partial")
        raise Boom("disk full")

    with pytest.raises(Boom, match="disk full"):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]
    assert atomic_write(target, lambda p: p.write_bytes(b"new")) == target
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["weights.bin"]


def test_bytes_text_and_torch_writers_round_trip(tmp_path):
    assert atomic_write_bytes(tmp_path / "b", b"\x00\xffab").read_bytes() == b"\x00\xffab"
    assert atomic_write_text(tmp_path / "t", "héllo\n").read_bytes() == "héllo\n".encode("utf-8")
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    back = torch.load(atomic_save(state, tmp_path / "s.pt"), weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    assert sorted(os.listdir(tmp_path)) == ["b", "s.pt", "t"]


def test_atomic_folder_keeps_the_old_folder_whole_when_save_raises(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "a.txt").write_text("old a")

    def bad_save(tmp: Path):
        tmp.mkdir()
        (tmp / "a.txt").write_text("new a")
        raise Boom()

    with pytest.raises(Boom):
        atomic_folder(folder, bad_save, replace=True)
    assert os.listdir(folder) == ["a.txt"] and (folder / "a.txt").read_text() == "old a"
    assert os.listdir(tmp_path) == ["run"]  # the temporary folder went with the failed save

    def good_save(tmp: Path):
        tmp.mkdir()
        (tmp / "b.txt").write_text("new b")

    assert atomic_folder(folder, good_save, replace=True) == folder
    assert os.listdir(folder) == ["b.txt"]  # the old folder is replaced as a whole, not merged
    assert os.listdir(tmp_path) == ["run"]  # no temporary folder left once a save succeeds


def test_atomic_folder_never_replaces_a_folder_unless_told_it_is_persviz_own(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "mine.jpg").write_bytes(b"user's")
    with pytest.raises(NotOursError, match="already exists"):
        atomic_folder(folder, lambda tmp: tmp.mkdir())
    assert (folder / "mine.jpg").read_bytes() == b"user's" and os.listdir(tmp_path) == ["images"]


def test_atomic_folder_leaves_a_tmp_folder_it_did_not_create(tmp_path):
    (tmp_path / "run.tmp").mkdir()  # the old code's fixed temporary name: someone else's now
    (tmp_path / "run.tmp" / "keep.txt").write_text("theirs")
    atomic_folder(tmp_path / "run", lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("1")))
    assert (tmp_path / "run.tmp" / "keep.txt").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["run", "run.tmp"]


def test_atomic_write_replaces_a_link_at_the_target_and_never_the_file_it_points_to(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "impacts.png"
    link.symlink_to(outside)
    atomic_write_bytes(link, b"png")  # no confined folder: the link itself is replaced
    assert outside.read_text() == "precious" and not link.is_symlink() and link.read_bytes() == b"png"


def test_confined_refuses_writes_through_links_that_lead_out(tmp_path):
    concept, elsewhere = tmp_path / "C", tmp_path / "elsewhere"
    concept.mkdir(), elsewhere.mkdir()
    (elsewhere / "impacts.png").write_text("theirs")
    (concept / "study").symlink_to(elsewhere)
    (concept / "fig.png").symlink_to(elsewhere / "impacts.png")
    with confined(concept):
        for target in (concept / "study" / "study.json", concept / "fig.png", concept / ".." / "x.json"):
            with pytest.raises(OutsideFolderError, match="leads outside"):
                write_json(target, {"a": 1})
        with pytest.raises(OutsideFolderError):
            make_dir(concept / "study" / "cells")
        with pytest.raises(OutsideFolderError):
            atomic_folder(concept / "study" / "images", lambda tmp: tmp.mkdir())
        with pytest.raises(OutsideFolderError):  # a folder confined inside must itself stay inside
            with confined(concept / "study"):
                pass
        write_json(concept / "inside" / "ok.json", {"a": 1})  # inside: written
    assert sorted(os.listdir(elsewhere)) == ["impacts.png"] and (elsewhere / "impacts.png").read_text() == "theirs"
    assert json.loads((concept / "inside" / "ok.json").read_text()) == {"a": 1}
    write_json(concept / "study" / "free.json", {})  # outside the block nothing is checked
    assert (elsewhere / "free.json").is_file()


def test_remove_file_unlinks_a_link_and_never_a_folder(tmp_path):
    target = tmp_path / "theirs.txt"
    target.write_text("x")
    (tmp_path / "link.json").symlink_to(target)
    remove_file(tmp_path / "link.json")
    assert target.read_text() == "x" and not (tmp_path / "link.json").exists()
    (tmp_path / "d").mkdir()
    with pytest.raises(NotOursError):
        remove_file(tmp_path / "d")
    assert (tmp_path / "d").is_dir()


def test_load_state_refuses_code_and_damage_with_a_sentence(tmp_path):
    marker = tmp_path / "ran"
    payload = tmp_path / "state.pt"
    torch.save({"step": 1, "x": Payload(marker)}, payload)
    with pytest.raises(DamagedFileError, match="delete it"):
        load_state(payload, "delete it")
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(payload.read_bytes()[:40])
    with pytest.raises(DamagedFileError, match="does not load"):
        load_state(tmp_path / "cut.pt", "delete it")


def test_to_jsonable_turns_numpy_torch_paths_and_non_finite_values_into_plain_json():
    x = {
        "f32": np.float32(1.5), "i64": np.int64(-3), "bool": np.bool_(True), "pybool": False,
        "nan": float("nan"), "inf": np.float64("inf"), "ninf": -math.inf,
        "tensor": torch.tensor([1.0, float("nan"), 2.5]), "scalar": torch.tensor(4),
        "array": np.array([[1, 2], [3, 4]], dtype=np.int32), "tuple": (np.float16(0.25), None, "s"),
        "path": Path("runs") / "a.json", 7: "int key",
    }
    out = to_jsonable(x)
    assert out == {
        "f32": 1.5, "i64": -3, "bool": True, "pybool": False, "nan": None, "inf": None, "ninf": None,
        "tensor": [1.0, None, 2.5], "scalar": 4, "array": [[1, 2], [3, 4]], "tuple": [0.25, None, "s"],
        "path": os.path.join("runs", "a.json"), "7": "int key",
    }
    assert type(out["f32"]) is float and type(out["i64"]) is int and type(out["bool"]) is bool
    assert type(out["scalar"]) is int and type(out["array"][0][0]) is int and type(out["tuple"]) is list
    json.dumps(out, allow_nan=False)  # plain Python all the way down


def test_write_json_is_strict_json_that_the_json_module_reads_back(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    obj = {"clip_t": np.float32(0.25), "curve": torch.tensor([0.5, float("inf")]), "n": np.int64(3),
           "missing": float("nan"), "rows": [{"a": np.array([1.0, -np.inf])}]}
    assert write_json(target, obj) == target
    text = target.read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert _strict_loads(text) == {"clip_t": 0.25, "curve": [0.5, None], "n": 3, "missing": None,
                                   "rows": [{"a": [1.0, None]}]}
    assert write_json(tmp_path / "flat.json", [1, 2], indent=None).read_text() == "[1, 2]\n"
    assert os.listdir(target.parent) == ["metrics.json"]


def test_write_json_of_something_unserialisable_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert _strict_loads(target.read_text()) == {"ok": 1} and os.listdir(tmp_path) == ["metrics.json"]

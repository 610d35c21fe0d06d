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

from persviz.io import (atomic_folder, atomic_path, atomic_save, atomic_write, atomic_write_bytes, atomic_write_text,
                        to_jsonable, write_json)


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
    back = torch.load(atomic_save(state, tmp_path / "s.pt"))
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
        atomic_folder(folder, bad_save)
    assert os.listdir(folder) == ["a.txt"] and (folder / "a.txt").read_text() == "old a"

    def good_save(tmp: Path):
        tmp.mkdir()
        (tmp / "b.txt").write_text("new b")

    assert atomic_folder(folder, good_save) == folder
    assert os.listdir(folder) == ["b.txt"]  # the old folder is replaced as a whole, not merged
    assert os.listdir(tmp_path) == ["run"]  # no temporary folder left once a save succeeds


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

"""Adopting another tool's run is part of the Method protocol (persviz.methods.base): every registered method
answers ``detect_run`` and ``check_run_fits``; methods of one weights kind share one implementation; a method
defined outside the package adopts runs through ``persviz.foreign_runs`` without any change to it."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persviz import methods
from persviz.concept_folder import ConceptFolderError, read_concept
from persviz.foreign_runs import LOOKED_FOR, adopt_run, check_run_fits, detect_run
from persviz.methods import METHODS, REGISTRY
from persviz.methods.base import ForeignRun, LoRAMethod, Method

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_answers_detect_run(tmp_path, name):
    """Each method detects its own runs (not the protocol's refusal) and says what it looked for in an empty folder."""
    m = REGISTRY[name]
    assert type(m).detect_run is not Method.detect_run and m.looked_for
    with pytest.raises(ConceptFolderError, match=f"is not a {name} run folder persviz recognises") as err:
        m.detect_run(tmp_path, None)
    assert str(err.value).endswith("looked for " + m.looked_for)


def test_methods_of_one_weights_kind_share_one_implementation():
    lora = [m for m in REGISTRY.values() if m.weights == "lora"]
    assert {m.name for m in lora} == {"dreambooth", "lora_finetune"}
    assert all(isinstance(m, LoRAMethod) for m in lora)
    for attr in ("detect_run", "check_run_files", "snapshots"):
        assert len({getattr(type(m), attr) for m in lora}) == 1, attr
    assert LOOKED_FOR == {n: REGISTRY[n].looked_for for n in METHODS}


def test_foreign_runs_asks_the_registry_and_branches_on_no_method():
    """foreign_runs names no method and no weights kind: the detection and the fit check live in the methods."""
    tree = ast.parse((ROOT / "persviz" / "foreign_runs.py").read_text())
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not literals & (set(REGISTRY) | {"token_rows", "lora", "attention_kv"})


@dataclass(frozen=True)
class Pinned(Method):
    """A method defined outside the package whose runs are a folder holding one 'pinned.txt' naming the token."""

    def detect_run(self, path, token=None):
        f = path / "pinned.txt"
        if not f.is_file():
            raise ConceptFolderError(f"{path} holds no pinned.txt")
        return ForeignRun(self.name, path, "pinned-tool", token or f.read_text().strip(), None, (f,))

    def check_run_files(self, found, pipe, text):
        if "wide" in found.files[0].read_text():
            raise ConceptFolderError(f"{found.files[0]} is for another model ({text.width} here)")


def test_a_new_method_adopts_runs_without_touching_foreign_runs(tmp_path, shapesworld_pipeline, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "pinned", Pinned("pinned", "pinned"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "pinned.txt").write_text("<pin>\n")
    found = detect_run("pinned", run)
    assert (found.method, found.source, found.token) == ("pinned", "pinned-tool", "<pin>")
    check_run_fits(found, shapesworld_pipeline, "circle")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(photos / f"p{i}.png")
    concept = adopt_run("pinned", run, tmp_path / "concept", photos, class_word="circle", pipe=shapesworld_pipeline)
    assert concept.runs["pinned"] == {"folder": str(run.resolve()), "token": "<pin>", "source": "pinned-tool"}
    assert read_concept(tmp_path / "concept").runs["pinned"]["source"] == "pinned-tool"
    (run / "pinned.txt").write_text("<pin> wide\n")
    with pytest.raises(ConceptFolderError, match="is for another model"):
        adopt_run("pinned", run, tmp_path / "other", photos, class_word="circle", pipe=shapesworld_pipeline)
    assert not (tmp_path / "other" / "concept.json").exists()  # every check runs before concept.json is written


def test_a_method_that_does_not_adopt_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "plain", Method("plain", "plain"))
    with pytest.raises(ConceptFolderError, match="persviz does not adopt plain runs of other tools yet"):
        detect_run("plain", tmp_path)

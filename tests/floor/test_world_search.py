"""persviz.shapesworld.world_search: the selection rule on hand-made cells, and a tiny search on the shipped micro-SD
that writes every cell, resumes without recomputing and leaves the pipeline as it found it."""
import json

import numpy as np
import pytest

from persviz.shapesworld import world_search as ws
from persviz.shapesworld.world_concepts import world_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cell(method, concept, lr, step, rate, seed_set="selection"):
    return {"method": method, "concept": concept, "lr": lr, "step": step, "seed_set": seed_set,
            "rate": {"rate": rate}}


def test_select_follows_the_preregistered_rule():
    g = ws.MethodGrid((1e-3, 3e-3), (100, 200))
    names = ("a", "b")
    rates = {(1e-3, 100): (0.5, 0.5), (1e-3, 200): (0.9, 0.5), (3e-3, 100): (0.7, 0.7), (3e-3, 200): (0.2, 0.2)}
    cells = [cell("textual_inversion", n, lr, k, r) for (lr, k), rs in rates.items() for n, r in zip(names, rs)]
    # (1e-3, 200) and (3e-3, 100) tie on the mean (0.7); the higher minimum (0.7) wins
    s = ws.select(cells, "textual_inversion", g, names)
    assert (s["lr"], s["step"], s["mean_rate"], s["min_rate"]) == (3e-3, 100, 0.7, 0.7)
    # equal mean and minimum: fewer steps, then the smaller lr
    flat = [cell("textual_inversion", n, lr, k, 0.6) for lr in g.lrs for k in g.steps for n in names]
    assert (ws.select(flat, "textual_inversion", g, names)["lr"], ws.select(flat, "textual_inversion", g,
                                                                          names)["step"]) == (1e-3, 100)
    # held-out cells and other methods do not count; a missing point means no selection yet
    noise = [cell("textual_inversion", "a", 3e-3, 200, 1.0, "held_out"), cell("dreambooth", "a", 3e-3, 200, 1.0)]
    assert ws.select(cells + noise, "textual_inversion", g, names)["lr"] == 3e-3
    assert ws.select(cells[:-1], "textual_inversion", g, names) is None


def test_round2_picks_each_concepts_best_grid_point():
    g = ws.MethodGrid((1e-3, 3e-3), (100, 200))
    rates = {"a": {(1e-3, 100): 0.5, (1e-3, 200): 0.9, (3e-3, 100): 0.9, (3e-3, 200): 0.2},
             "b": {(1e-3, 100): 0.0, (1e-3, 200): 0.0, (3e-3, 100): 0.0, (3e-3, 200): 0.0}}
    cells = [cell("dreambooth", n, lr, k, r) for n, by in rates.items() for (lr, k), r in by.items()]
    # a: 0.9 at (1e-3, 200) and (3e-3, 100): fewer steps wins; b: all zero: fewer steps, then the smaller lr
    a, b = (ws.select_per_concept(cells, "dreambooth", g, n) for n in ("a", "b"))
    assert (a["lr"], a["step"], a["selection_rate"]) == (3e-3, 100, 0.9)
    assert (b["lr"], b["step"], b["selection_rate"]) == (1e-3, 100, 0.0)
    # held-out cells, other concepts and methods do not count; a missing point means no choice yet
    noise = [cell("dreambooth", "a", 3e-3, 200, 1.0, "held_out"), cell("textual_inversion", "a", 3e-3, 200, 1.0)]
    assert ws.select_per_concept(cells + noise, "dreambooth", g, "a")["step"] == 100
    assert ws.select_per_concept(cells[1:], "dreambooth", g, "a") is None


def test_slot_words_and_tokens():
    assert ws.slot_word("textual_inversion", "candy") == "<candy>"
    assert ws.slot_word("dreambooth", "candy") == "sks circle"
    assert ws.slot_word("custom_diffusion", "checkers") == "<checkers-cd> square"
    with pytest.raises(ValueError, match="unknown method"):
        ws.slot_word("lora", "candy")


class ReadsEverything:
    """A stand-in oracle that reads the given object in the center of every image."""

    def __init__(self, obj):
        self.obj = obj

    def read(self, images):
        return [{"background": "white", "left": None, "center": self.obj, "right": None} for _ in images]


TINY = {"textual_inversion": ws.MethodGrid((1e-3,), (2, 4)),
        "dreambooth": ws.MethodGrid((1e-3, 3e-3), (2,), {"num_class_images": 2}),  # two runs of one class word
        "custom_diffusion": ws.MethodGrid((1e-4,), (2,))}


@pytest.fixture(scope="module")
def tiny_search(shapesworld_pipeline, tmp_path_factory):
    """A tiny search (1 concept, every method, 1 prompt x 1 seed, 3 sampling steps) with an oracle that always
    finds the concept; returns (out, status, pipeline state before)."""
    pipe = shapesworld_pipeline
    before = (set(pipe.tokenizer.get_added_vocab()), {k: type(v) for k, v in pipe.unet.attn_processors.items()},
              pipe.text_encoder.get_input_embeddings().weight.detach().clone(), pipe.text_encoder.config.vocab_size)
    out = tmp_path_factory.mktemp("search")
    status = ws.run_search(pipe, ReadsEverything(world_recipe("candy")), out, concepts=("candy",), grid=TINY,
                           selection_seeds=(1,), held_out_seeds=(2,), templates=("a photo of a {}",),
                           sample_steps=3, log=lambda s: None)
    return out, status, before


def test_tiny_search_writes_every_cell_and_selects(tiny_search):
    out, status, _ = tiny_search
    assert status["left"] == []
    assert len(status["done"]) == 2 + 2 + 1 + 3  # TI at 2 steps, DB at 2 lrs, CD, one held-out cell per method
    assert set(status["selected"]) == set(ws.METHODS)
    c = json.loads((out / "cells" / "textual_inversion__candy__lr0.001__step4__selection.json").read_text())
    assert c["prompts"] == ["a photo of a <candy>"] and c["hits"] == [[1]] and c["rate"]["rate"] == 1.0
    assert c["closest"] == [[[world_recipe("candy")[k] for k in ("shape", "color", "texture", "size")]]]
    assert all(h["meets_target"] is False for h in status["held_out"])  # 1 of 1: Wilson's bound is below 0.7
    assert (ws.run_folder(out, "textual_inversion", "candy", 1e-3) / "learned_embeds-steps-2.safetensors").exists()
    rows = ws.results_table(out)
    assert [(r["method"], r["seed_set"], r["step"]) for r in rows[:3]] == [
        ("textual_inversion", "selection", 2), ("textual_inversion", "selection", 4), ("textual_inversion", "held_out", 2)]  # a tie: fewer steps
    assert all(r["misread"]["most_common"][0] == ("large pink striped circle", 1) for r in rows)
    assert "most read: large pink striped circle" in ws.format_status(status, out)
    table = ws.results_markdown(out).splitlines()
    assert len(table) == 2 + len(rows) and "| textual_inversion | candy | 0.001 | 2 | selection | 1.000 | 1/1 |" in table[2]


def test_round2_measures_each_choice_on_its_own_seeds_without_training(tiny_search, shapesworld_pipeline, monkeypatch):
    out, _, _ = tiny_search
    monkeypatch.setattr(ws, "TRAINERS", {})  # round 2 trains nothing: a trainer call would fail here
    picks = ws.run_round2(shapesworld_pipeline, ReadsEverything(world_recipe("candy")), out, concepts=("candy",),
                          grid=TINY, seeds=(3,), templates=("a photo of a {}",), sample_steps=3, log=lambda s: None)
    assert [(p["method"], p["lr"], p["step"]) for p in picks] == [
        ("textual_inversion", 1e-3, 2), ("dreambooth", 1e-3, 2), ("custom_diffusion", 1e-4, 2)]
    c = json.loads((out / "cells" / "dreambooth__candy__lr0.001__step2__held_out2.json").read_text())
    assert c["seeds"] == [3] and c["seed_set"] == "held_out2" and c["hits"] == [[1]]
    assert json.loads((out / "selected" / "dreambooth__candy__round2.json").read_text())["lr"] == 1e-3


def test_tiny_search_leaves_the_pipeline_as_it_found_it(tiny_search, shapesworld_pipeline):
    _, _, (vocab, procs, emb, size) = tiny_search
    pipe = shapesworld_pipeline
    assert set(pipe.tokenizer.get_added_vocab()) == vocab
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == procs
    assert pipe.text_encoder.get_input_embeddings().weight.shape == emb.shape
    assert pipe.text_encoder.config.vocab_size == size == emb.shape[0]  # else peft saves the matrix into a LoRA
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_tiny_search_resumes_without_recomputing(tiny_search, shapesworld_pipeline, monkeypatch):
    out, status, _ = tiny_search

    def refuse(*a, **k):
        raise AssertionError("a finished cell was computed again")

    monkeypatch.setattr(ws, "TRAINERS", {m: refuse for m in ws.METHODS})
    monkeypatch.setattr(ws, "evaluate_snapshot", refuse)
    again = ws.run_search(shapesworld_pipeline, None, out, concepts=("candy",), grid=TINY, selection_seeds=(1,),
                          held_out_seeds=(2,), templates=("a photo of a {}",), sample_steps=3, log=lambda s: None)
    assert again == status


def test_the_oracle_decides_the_hits(tiny_search, shapesworld_pipeline):
    out, _, _ = tiny_search
    path = ws.snapshot_at("textual_inversion", ws.run_folder(out, "textual_inversion", "candy", 1e-3), 2)
    other = {**world_recipe("candy"), "color": "blue"}
    res = ws.evaluate_snapshot(shapesworld_pipeline, ReadsEverything(other), "textual_inversion", "candy", path,
                               (1, 2), ("a photo of a {}", "a {} on a white background"), sample_steps=3)
    assert np.array(res["hits"]).shape == (2, 2) and res["rate"]["rate"] == 0.0
    with pytest.raises(FileNotFoundError, match="no snapshot at step 3"):
        ws.snapshot_at("textual_inversion", path.parent, 3)


def test_misreadings_count_the_wrong_attributes_of_the_closest_object():
    recipe = {"shape": "square", "color": "yellow", "texture": "checkered", "size": "large"}
    cells = [{"recipe": recipe, "closest": [[["circle", "yellow", "striped", "large"], None],
                                            [["square", "yellow", "checkered", "large"],
                                             ["circle", "yellow", "striped", "large"]]]}]
    m = ws.misreadings(cells)
    assert m["n"] == 4 and m["none"] == 0.25
    assert (m["shape"], m["color"], m["texture"], m["size"]) == (0.5, 0.0, 0.5, 0.0)
    assert m["most_common"][0] == ("large yellow striped circle", 2)
    assert ws.misreadings([{"recipe": recipe}]) == {}

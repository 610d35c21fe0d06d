"""persviz.tea.concept_study's helpers of notebooks 01-02: one code path over concept folders at both scales."""
import numpy as np
import pytest
import torch

from persviz import session
from persviz.concept_folder import Concept, read_concept
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR, eval_prompts
from persviz.tea import concept_study as cs
from tests.helpers import make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shipped(name):
    return read_concept(CONCEPTS_DIR / name)


def test_the_paper_generation_is_the_same_in_the_session_and_the_study():
    assert {k: session.PAPER_GENERATION[k] for k in cs.PAPER_GENERATION} == cs.PAPER_GENERATION


def test_shipped_concepts_get_the_probes_of_their_runs():
    """probes_for of a shipped folder avoids its references' backgrounds: the notebooks' probes are unchanged."""
    for name in CONCEPTS:
        assert cs.probes_for(shipped(name), 8, seed=3) == eval_prompts(name, 8, seed=3)


def test_full_scale_probes_are_the_papers_of_the_class_else_the_sd15_set():
    dog = Concept("<my-dog>", "dog", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    probes = cs.probes_for(dog, 3)
    assert len(probes) == 3 and all("{}" in p["template"] and p["context_text"] for p in probes)
    assert all("{} dog" not in p["template"] for p in probes)  # the slot takes '<my-dog>' or 'sks dog'
    other = cs.full_scale_probes("spaceship", 2)
    assert len(other) == 2 and all(p["template"].count("{}") == 1 for p in other)
    assert cs.shift_sets(dog) == ("sd15_contextual", "sd15_simple")
    assert cs.shift_sets(shipped("candy")) == ("shapesworld_contextual", "shapesworld_simple")


def test_probe_labels():
    assert cs.probe_label({"context": {}, "context_text": "in the snow"}) == "in the snow"
    p = {"context": {"background": "black", "position": "left", "second": ("blue", "circle")}, "context_text": "x"}
    assert cs.probe_label(p) == "left, by blue circle\non black"


def test_snapshots_are_picked_by_fraction_of_the_run():
    run = shipped("candy").run_dir("textual_inversion")
    init = torch.zeros(128)
    snaps = cs.spaced_snapshots(run, 30, init)
    assert [s for s, _ in snaps] == list(range(0, 3001, 100)) and snaps[0][1] is init
    assert [s for s, _ in cs.at_fractions(snaps, (0, 1 / 6, 1 / 3, 2 / 3, 1))] == [0, 500, 1000, 2000, 3000]
    assert [s for s, _ in cs.at_fractions(snaps, (0, 1 / 30, 1 / 15, 1 / 10, 1 / 6, 1 / 3, 2 / 3, 1))] == [
        0, 100, 200, 300, 500, 1000, 2000, 3000]
    assert [s for s, _ in cs.spaced_snapshots(run, 6)] == [500, 1000, 1500, 2000, 2500, 3000]
    short = [(0, None), (2, None), (4, None)]  # a 4-step run saved every 2: each step once
    assert [s for s, _ in cs.at_fractions(short, (0, 1 / 6, 1 / 3, 2 / 3, 1))] == [0, 2, 4]
    torch.testing.assert_close(cs.final_embedding(shipped("candy")), snaps[-1][1])


def test_saved_studies_and_tables_of_the_shipped_concepts():
    rows, title = cs.saved_study_rows([shipped(n) for n in CONCEPTS])
    assert title == "the full-size study (24 prompts x 2 seeds, written by the training script)"
    assert [r["concept"] for r in rows] == [n for n in CONCEPTS for _ in range(3)] and "oracle_context" in rows[0]
    table, title = cs.saved_tea_table(shipped("candy"))
    assert title == "mean over the three concepts, 24 prompts x 2 seeds" and "dreambooth TEA" in table


def test_a_concept_without_a_saved_study_says_how_to_write_one(tmp_path):
    bare = Concept("<x>", "dog", "stable-diffusion-v1-5/stable-diffusion-v1-5", folder=tmp_path)
    rows, message = cs.saved_study_rows([bare])
    assert rows == [] and "persviz study" in message and cs.saved_tea_table(bare) is None


def test_reference_grid_takes_the_fewest_and_resizes(monkeypatch):
    sizes = {"candy": (6, 64), "spark": (4, 16)}  # (images, side)
    monkeypatch.setattr(Concept, "reference_images", lambda self: np.zeros(
        (sizes[self.name][0], sizes[self.name][1], sizes[self.name][1], 3), np.uint8))
    images, cols = cs.reference_grid([shipped("candy"), shipped("spark")])
    assert cols == 4 and images.shape == (8, 64, 64, 3)


def test_set_aside_unloads_a_learned_token_and_loads_it_back():
    pipe = make_tiny_sd_pipeline()
    pipe.load_textual_inversion({"<x>": torch.full((32,), 3.0)}, token="<x>")
    with cs.set_aside(pipe, "<x>"):
        assert "<x>" not in pipe.tokenizer.get_added_vocab()
        pipe.load_textual_inversion({"<x>": torch.ones(32)}, token="<x>")  # a run of the same token loads
        pipe.unload_textual_inversion("<x>")
    row = pipe.tokenizer.convert_tokens_to_ids("<x>")
    assert float(pipe.text_encoder.get_input_embeddings().weight[row, 0].detach()) == 3.0
    with cs.set_aside(pipe, "<never-loaded>"):
        pass


def test_dominance_needs_two_tokens():
    c = shipped("candy")
    with pytest.raises(ValueError, match="two different"):
        cs.dominance(None, c, c, None, (0, 1))

"""The shipped personalization runs of the ShapesWorld concepts: complete, reproducible from their config, and
their study numbers recomputable from the snapshots."""
import shutil

import pytest
import numpy as np
import torch

from persviz.shapesworld.concepts import CONCEPTS
from persviz.tea.shapesworld_runs import METHODS, run_dir, run_textual_inversion, snapshots
from persviz.tea.tracker import load_json, track_semantic_shift
from persviz.trainers import list_snapshots


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_every_run_is_shipped_with_its_snapshots(method, name):
    run = run_dir(method, name)
    assert (run / "config.json").is_file(), f"missing run {run}; train with persviz tea runs"
    if method == "textual_inversion":
        assert [k for k, _ in list_snapshots(run)] == list(range(100, 3001, 100))
        assert (run / "learned_embeds.safetensors").is_file()


def test_a_shipped_ti_run_matches_the_command_that_made_it(shapesworld_pipeline, tmp_path):
    # resuming the finished run with the command's own config passes the trainer's fingerprint check and trains
    # nothing: the shipped files are what `personalize` writes for this pipeline and these reference images
    pipe = shapesworld_pipeline
    shutil.copytree(run_dir("textual_inversion", "checkers"), run_dir("textual_inversion", "checkers", tmp_path))
    res = run_textual_inversion(pipe, "checkers", root=tmp_path)
    assert res.steps == 3000 and len(res.loss_history) == 3000
    shipped = torch.load(run_dir("textual_inversion", "checkers") / "resume_state.pt", weights_only=False)["rows"]
    from persviz.trainers import load_snapshot_embedding
    torch.testing.assert_close(load_snapshot_embedding(res.final_path).reshape(shipped.shape), shipped)


def test_study_text_columns_recompute_from_the_snapshots(shapesworld_pipeline):
    pipe = shapesworld_pipeline
    study = load_json(run_dir("textual_inversion", "candy") / "study.json")
    text = study["text"]
    picks = [0, len(text["step"]) - 1]
    snaps = dict(snapshots(run_dir("textual_inversion", "candy")))
    again = track_semantic_shift(pipe, [(text["step"][i], snaps[text["step"][i]]) for i in picks],
                                 "shapesworld_contextual", "shapesworld_simple", class_word="circle",
                                 placeholder="<candy>", progress=False)
    for key in ("inter_l2", "inter_kl", "intra_vstar_l2", "norm_ratio"):
        assert again[key] == pytest.approx([text[key][i] for i in picks], rel=1e-4)


@pytest.mark.parametrize("method,rows", [("textual_inversion", {"none", "TEA"}), ("dreambooth", {"none", "TEA", "TEA unaligned"}),
                                         ("custom_diffusion", {"none", "TEA"})])
def test_run_tea_rows_loads_a_shipped_run_and_leaves_the_pipeline_as_it_was(shapesworld_pipeline, method, rows):
    pipe = shapesworld_pipeline
    from persviz.shapesworld.concepts import eval_prompts
    from persviz.tea.shapesworld_runs import run_tea_rows
    n_tok, procs = len(pipe.tokenizer), dict(pipe.unet.attn_processors)
    out = run_tea_rows(pipe, method, "checkers", eval_prompts("checkers", 1), lambda im: {"mean": float(im.mean())})
    assert set(out) == rows and out["none"] != out["TEA"]
    assert len(pipe.tokenizer) == n_tok
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in procs.items()}


@pytest.mark.parametrize("name", ["checkers", "candy", "spark"])
def test_the_shipped_concepts_are_concept_folders(name):
    """The format `persviz train` writes: concept.json, the reference images, one run folder per method."""
    from persviz.concept_folder import read_concept
    from persviz.shapesworld.concepts import CONCEPTS_DIR, get_concept, load_references
    concept = read_concept(CONCEPTS_DIR / name)
    assert (concept.placeholder, concept.class_word, concept.model) == (f"<{name}>", get_concept(name).class_word,
                                                                        "shapesworld")
    assert np.array_equal(concept.reference_images(), load_references(name))
    for method in ("textual_inversion", "dreambooth", "custom_diffusion"):
        assert concept.run_dir(method) == run_dir(method, name).resolve()
        assert (concept.run_dir(method) / "config.json").is_file()

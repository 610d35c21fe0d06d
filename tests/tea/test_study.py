"""persviz.tea.study: a learned token at any step, the impacts table, dominance, on a tiny random pipeline."""
import numpy as np
import pytest
import torch

from persviz.generation import generate
from persviz.metrics import clip_t
from persviz.shapesworld.concepts import eval_prompts, load_references
from persviz.tea.study import dominance_over_steps, impacts_over_steps, learned_embedding, score_images
from tests.helpers import make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBES = eval_prompts("checkers", n=2)


def test_learned_embedding_adds_then_removes_a_new_token():
    pipe = make_tiny_sd_pipeline()
    n_tok, w0 = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    v = torch.randn(w0.shape[1])
    with learned_embedding(pipe, "<x>", v):
        row = pipe.tokenizer.convert_tokens_to_ids("<x>")
        torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[row], v)
    assert len(pipe.tokenizer) == n_tok and "<x>" not in pipe.tokenizer.get_added_vocab()
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight, w0)


def test_learned_embedding_overwrites_a_loaded_token_and_restores_it():
    pipe = make_tiny_sd_pipeline()
    pipe.load_textual_inversion({"<x>": torch.ones(32)}, token="<x>")
    row = pipe.tokenizer.convert_tokens_to_ids("<x>")
    with learned_embedding(pipe, "<x>", torch.full((32,), 2.0)):
        assert float(pipe.text_encoder.get_input_embeddings().weight[row, 0].detach()) == 2.0
    assert float(pipe.text_encoder.get_input_embeddings().weight[row, 0].detach()) == 1.0


@pytest.mark.parametrize("bad", [torch.full((32,), float("nan")), torch.ones(7)])
def test_learned_embedding_refuses_nan_or_wrong_width(bad):
    with pytest.raises(ValueError, match="NaN|width"):
        with learned_embedding(make_tiny_sd_pipeline(), "<x>", bad):
            pass


def test_impacts_equal_scores_of_images_generated_directly(clip_eval):
    pipe = make_tiny_sd_pipeline()
    refs = load_references("checkers")
    snaps = [(0, torch.zeros(32) + 0.1), (100, torch.randn(32, generator=torch.Generator().manual_seed(1)))]
    table = impacts_over_steps(pipe, snaps, "<c>", "square", PROBES, refs, clip_eval, progress=False)
    assert table["step"] == [0, 100]
    with learned_embedding(pipe, "<c>", snaps[1][1]):
        images = generate(pipe, [p["template"].format("<c>") for p in PROBES], seed=0)
    direct = clip_t(clip_eval, images, [p["context_text"] for p in PROBES]).mean()
    assert table["clip_t_context"][1] == pytest.approx(float(direct), rel=1e-5)
    assert table["clip_i"][1] == pytest.approx(score_images(images, PROBES, "square", refs, clip_eval)["clip_i"])


def test_dominance_needs_both_placeholders(clip_eval):
    pipe = make_tiny_sd_pipeline()
    anchors = {"<a>": load_references("checkers")[:1], "<b>": load_references("candy")[:1]}
    with pytest.raises(ValueError, match="both placeholders"):
        dominance_over_steps(pipe, ("<a>", torch.ones(32)), ("<zz>", [(0, torch.ones(32))]), "a {a}", anchors,
                             clip_eval, n_images=1, progress=False)
    t = dominance_over_steps(pipe, ("<a>", torch.ones(32)), ("<b>", [(0, torch.ones(32)), (1, -torch.ones(32))]),
                             "a {a} next to a {b}", anchors, clip_eval, n_images=1, progress=False)
    assert t["step"] == [0, 1] and len(t["clip_i_<a>"]) == 2


def test_score_images_checks_counts(clip_eval):
    with pytest.raises(ValueError, match="probes"):
        score_images(np.zeros((3, 32, 32, 3), np.uint8), PROBES, "square", load_references("checkers"), clip_eval)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step TI, DreamBooth-LoRA and Custom Diffusion runs of a tiny pipeline."""
    from persviz.trainers import (CustomDiffusionConfig, DreamBoothLoRAConfig, TextualInversionConfig, train_custom_diffusion,
                                  train_dreambooth_lora, train_textual_inversion)
    root, pipe, imgs = tmp_path_factory.mktemp("runs"), make_tiny_sd_pipeline(), load_references("checkers")
    train_textual_inversion(pipe, imgs, TextualInversionConfig(placeholder="<c>", steps=2, save_every=1, lr=0.05), root / "textual_inversion",
                            progress=False, load_result=False)
    train_dreambooth_lora(pipe, imgs, DreamBoothLoRAConfig(steps=2, save_every=1, lr=0.05, prior_preservation=False),
                          root / "dreambooth", progress=False, load_result=False)
    train_custom_diffusion(pipe, imgs, CustomDiffusionConfig(modifier_token="<m>", steps=2, save_every=1, lr=0.05),
                           root / "custom_diffusion", progress=False, load_result=False)
    return root


@pytest.mark.parametrize("method,word,token,rows", [
    ("textual_inversion", "<c>", "<c>", {"none", "TEA"}), ("dreambooth", "sks square", "sks", {"none", "TEA", "TEA unaligned"}),
    ("custom_diffusion", "<m> square", "<m>", {"none", "TEA"})])
def test_personalized_runs_load_give_tea_rows_and_unload(runs, method, word, token, rows):
    from persviz.tea.study import personalized, tea_rows
    pipe = make_tiny_sd_pipeline()
    before = generate(pipe, ["a square"], seed=0)
    n_tok = len(pipe.tokenizer)
    seen = {}

    def score(images):
        seen[len(seen)] = images
        return {"mean": float(images.mean())}
    with personalized(pipe, method, runs / method):
        out = tea_rows(pipe, method, word, token, "square", PROBES, score)
    assert set(out) == rows
    assert not np.array_equal(seen[0], seen[1])  # TEA changed the images of the same seeds
    assert len(pipe.tokenizer) == n_tok
    np.testing.assert_array_equal(generate(pipe, ["a square"], seed=0), before)


def test_personalized_refuses_an_unknown_method(runs):
    from persviz.tea.study import personalized
    with pytest.raises(ValueError, match="unknown method"):
        with personalized(make_tiny_sd_pipeline(), "lora", runs / "dreambooth"):
            pass


def test_sweep_cells_equal_direct_generation_under_tea(clip_eval):
    from persviz.tea.pipeline import tea
    from persviz.tea.study import tea_sweep
    pipe = make_tiny_sd_pipeline()
    pipe.load_textual_inversion({"<c>": torch.randn(32, generator=torch.Generator().manual_seed(3))}, token="<c>")

    def score(images):
        return {"m": float(images.astype(float).mean())}
    grid = tea_sweep(pipe, PROBES, "<c>", "square", score, [0.0, 1.0], [0.0, 1.0], progress=False)
    assert grid["m"].shape == (2, 2)
    with tea(pipe, "<c>", "square", rotation=1.0, scale=0.0):
        direct = generate(pipe, [p["template"].format("<c>") for p in PROBES], seed=0)
    assert grid["m"][1, 0] == pytest.approx(direct.astype(float).mean())


def test_adaptive_vs_fixed_rows(clip_eval):
    from persviz.tea.study import adaptive_vs_fixed
    pipe = make_tiny_sd_pipeline()
    pipe.load_textual_inversion({"<c>": torch.randn(32, generator=torch.Generator().manual_seed(3))}, token="<c>")
    rows = adaptive_vs_fixed(pipe, PROBES[:1], "<c>", "square", load_references("checkers"), clip_eval,
                             schedule=(0.0, 0.5), n_images=1, progress=False)
    (row,) = rows
    assert row["status"] in ("target", "floor", "exhausted", "none_acceptable") and 1 <= row["tried"] <= 2
    assert row["rotation"] in (None, 0.0, 0.5)

"""The shipped ShapesWorld models, measured against the world's ground truth on fresh samples."""
import numpy as np
import torch

from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld import render_batch, sample_scenes
from persviz.shapesworld.data import make_dataset
from persviz.shapesworld.evaluate import clip_zero_shot, oracle_accuracy, sd_faithfulness, weights_megabytes


def test_all_shipped_weights_fit_in_50_megabytes():
    sizes = weights_megabytes()
    assert {"clip", "sd/unet", "sd/vae", "sd/text_encoder", "oracle", "dino"} <= set(sizes)
    assert sum(sizes.values()) <= 50.0


def test_oracle_reads_fresh_renders(oracle):
    acc = oracle_accuracy(oracle, n=400, seed=2024)
    assert min(acc.values()) >= 0.98, acc


def test_clip_zero_shot_on_fresh_renders(clip_eval):
    acc = clip_zero_shot(clip_eval, n=300, seed=2025)
    assert min(acc["shape"], acc["color"], acc["background"]) >= 0.9, acc


def test_clip_matches_images_to_their_own_captions(clip_eval):
    from persviz.shapesworld import caption
    scenes = sample_scenes(64, seed=7, p_second=0.0)
    img = clip_eval.embed_images(render_batch(scenes))
    txt = clip_eval.embed_texts([caption(s, level="full") for s in scenes])
    assert torch.allclose(img.norm(dim=-1), torch.ones(64), atol=1e-5)
    retrieval = (img @ txt.T).argmax(1).numpy()
    assert np.mean(retrieval == np.arange(64)) > 0.5  # chance: 1/64


def test_dino_encoder_finds_the_same_scene_under_jitter_and_noise():
    from persviz.loading import load_evaluator
    dino = load_evaluator(kind="dino")
    scenes = sample_scenes(100, seed=8)
    a = dino.embed_images(render_batch(scenes, seed=1, jitter=0.04))
    b = dino.embed_images(render_batch(scenes, seed=2, jitter=0.04))
    assert np.mean((a @ b.T).argmax(1).numpy() == np.arange(100)) > 0.8  # chance: 1/100


def test_micro_sd_draws_what_the_prompt_names(shapesworld_pipeline, oracle):
    pipe = shapesworld_pipeline
    acc = sd_faithfulness(pipe, oracle, n=60, seed=31)
    assert min(acc["shape"], acc["color"], acc["background"]) >= 0.75, acc


def test_generation_is_seeded(shapesworld_pipeline):
    pipe = shapesworld_pipeline
    from persviz.generation import generate
    a = generate(pipe, ["a red circle on a gray background"] * 2, seed=5, steps=5)
    b = generate(pipe, ["a blue square", "a red circle on a gray background"], seed=4, steps=5)
    assert np.array_equal(a[0], b[1]) and not np.array_equal(a[0], a[1])


def test_dataset_labels_follow_scenes():
    d = make_dataset(50, seed=3)
    assert d["images"].shape == (50, 32, 32, 3) and d["labels"].shape == (50, 13)
    assert (d["labels"][:, 0] == d["codes"][:, 5]).all()  # background

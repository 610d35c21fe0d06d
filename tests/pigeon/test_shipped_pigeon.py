"""The shipped Pigeon weights (data/pigeon): they load, stage 2 changed only what DPO trains, the history
carries the held-out users' taste (oracle ground truth), and the token-level comparison's mask measures are what
the shipped stage-1 mask generator gives against the renderer's per-token ground truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from persviz.loading import load_evaluator
from persviz.paths import DATA_DIR
from persviz.pigeon import PigeonPipeline, taste_report
from persviz.pigeon.measures import chance_kept_noise_share, perfect_kept_noise_share
from persviz.pigeon.study import (heldout_dataset, history_mode, load_comparison, mask_measures, pick_windows,
                                  window_masks)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = {s: DATA_DIR / "pigeon" / s for s in ("stage1", "stage2")}
TOKEN = DATA_DIR / "pigeon" / "token"


@pytest.mark.parametrize("folders", [(STAGES["stage1"], STAGES["stage2"]), (TOKEN / "stage1", TOKEN / "stage2")],
                         ids=["image", "token"])
def test_stage2_trained_only_the_personalization_module(folders) -> None:
    w1, w2 = (load_file(str(f / "pigeon.safetensors")) for f in folders)
    assert w1.keys() == w2.keys()
    mask = [k for k in w1 if k.startswith("mask_generator.")]
    pers = [k for k in w1 if k.startswith("personalization.")]
    assert mask and pers and len(mask) + len(pers) == len(w1)
    assert all(torch.equal(w1[k], w2[k]) for k in mask)              # frozen in stage 2
    assert any(not torch.equal(w1[k], w2[k]) for k in pers)          # DPO moved the module


@pytest.fixture(scope="module")
def stage1() -> PigeonPipeline:
    return PigeonPipeline.from_shapesworld(weights=STAGES["stage1"])


def test_history_carries_the_taste_of_heldout_users(stage1) -> None:
    ds = heldout_dataset(0.0)
    idx = pick_windows(ds, 12)
    b = default_collate([ds[i] for i in idx])
    windows = [ds.window(i) for i in idx]
    oracle = load_evaluator(kind="oracle")
    reports = {}
    for mode in ("mask", "none"):
        with history_mode(stage1, mode):
            images = stage1(b["history"], b["reference"], b["instruction"], reference_ratio=0.5, generator=0).images
        reports[mode] = taste_report(oracle.read(images * 2 - 1), windows, anywhere=True)
    # chance of a whole-taste hit is about 1.5/8 * 1/4 * 1/5 < 0.01; comparison.json has 0.67 vs 0.00 on 48 windows
    assert reports["mask"]["background"] >= 0.8 and reports["none"]["background"] <= 0.5
    assert reports["mask"]["taste"] >= reports["none"]["taste"] + 0.25


def test_token_comparison_mask_measures_recompute_from_the_shipped_stage1() -> None:
    rows, settings = load_comparison(TOKEN / "comparison.json")
    assert settings["regime"] == "token" and settings["n_windows"] == 48
    assert {r["key"] for r in rows} == {"no_history", "no_mask", "baseline", "stage1", "stage2"}
    stage1 = PigeonPipeline.from_shapesworld(weights=TOKEN / "stage1")
    row = next(r for r in rows if r["key"] == "stage1" and r["noise_rate"] == 0.4)
    stored = row["masks"]["items"]
    ds = heldout_dataset(0.4, regime="token")
    idx = stored["window"][:12]
    fresh = mask_measures(stage1, ds, idx, n_boot=200)
    for k in ("kept_noise_share", "perfect", "chance", "score_auc"):
        np.testing.assert_allclose(fresh["items"][k], stored[k][:12], atol=1e-6, err_msg=k)
    # perfect and chance by the closed forms, from the renderer's ground truth of the same windows
    truth = torch.stack([ds[i]["history_distractor_tokens"] for i in idx])
    assert np.isclose(np.mean(stored["chance"][:12]), chance_kept_noise_share(truth), atol=1e-9)
    per_image_k = 12  # keep_count(16, 0.2)
    by_hand = float(np.clip(truth.sum(-1).numpy() - (16 - per_image_k), 0, None).sum() / (truth.shape[0] * 5 * 12))
    assert np.isclose(perfect_kept_noise_share(truth, 0.2), by_hand)
    assert row["masks"]["perfect"] < row["masks"]["kept_noise_share"] < row["masks"]["chance"]  # what the docs say
    m = window_masks(stage1, ds, idx[0])  # the notebook's figure input carries the same ground truth
    assert np.array_equal(m["history_distractor_tokens"], truth[0].numpy()) and m["history_mask"].sum() == 5 * 12

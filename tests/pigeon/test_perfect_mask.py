"""The perfect-mask control and the decoy regime on tiny random parts (docs/pigeon.md, "Finding (vi)"): the history
read through the ground truth's mask zeroes exactly the renderer's distractor tokens, training with it reads the
dataset's labels, the decoy regime differs from the token regime only in the distractors' color and texture, and the
control table pairs its rows. CPU, one thread, ~40 s."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from persviz.cli import main as cli_main
from persviz.pigeon import control as ctl
from persviz.pigeon import study as st
from persviz.pigeon.measures import perfect_keep_mask, truth_keep_mask
from persviz.pigeon.model import CONFIG_FILE
from persviz.pigeon.train import TrainConfig, train
from persviz.pigeon.users import (PigeonDataset, Taste, decoy_style, make_users)
from persviz.shapesworld.scene import COLORS, TEXTURES

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers, numpy 2
N_USERS = 20


@pytest.fixture(scope="module")
def init_weights(tiny_pigeon_pipeline):
    return tiny_pigeon_pipeline.model.trainable_state_dict()


@pytest.fixture
def fresh(tiny_pigeon_pipeline, init_weights):
    pipe = tiny_pigeon_pipeline
    pipe.model.load_trainable_state_dict(init_weights)
    pipe.model.eval()
    pipe.model.history_mode = "mask"
    return pipe


@pytest.fixture(scope="module")
def token_ds():
    return PigeonDataset(make_users(4, seed=0, noise_rates=0.4, regime="token"), seed=0)


# ---------------------------------------------------------------- the ground truth's mask


def test_truth_keep_mask_is_the_complement_of_the_labels_and_the_budget_mask_keeps_k() -> None:
    noise = torch.tensor([[True, False, False, True], [False, False, False, False], [True, True, True, False]])
    assert torch.equal(truth_keep_mask(noise), ~noise)
    # hand-worked: ratio 0.5 keeps 2 of 4 tokens, distractors dropped first, lower index first within a kind
    assert perfect_keep_mask(noise, 0.5).tolist() == [[False, True, True, False], [True, True, False, False],
                                                      [True, False, False, True]]


def test_truth_mode_zeroes_exactly_the_renderers_distractor_tokens(fresh, token_ds) -> None:
    b = default_collate([token_ds[i] for i in range(3)])
    labels = b["history_distractor_tokens"]
    assert labels.any() and (~labels).any()
    model = fresh.model
    # independent reference: the visual tokenizer's tokens of the history images, the dataset's renderer labels
    tokens = model.visual(b["history"].flatten(0, 1)).view(3, 5, 16, -1)
    model.history_mode = "truth"
    with torch.no_grad():
        inputs = model.prepare(b["history"], b["reference"], b["instruction"], 0.5, training=False,
                               history_keep=truth_keep_mask(labels))
    assert torch.equal(inputs.history_mask.bool(), ~labels)
    assert torch.equal(inputs.history_tokens[~labels], tokens[~labels])
    assert float(inputs.history_tokens[labels].abs().max()) == 0.0
    with pytest.raises(ValueError, match="history_mode 'truth' only"):
        model.prepare(b["history"], b["reference"], b["instruction"], 0.5, training=False)  # truth without a mask
    model.history_mode = "keep"
    with pytest.raises(ValueError, match="history_mode 'truth' only"):
        model.prepare(b["history"], b["reference"], b["instruction"], 0.5, training=False, history_keep=~labels)
    model.history_mode = "truth"
    with pytest.raises(ValueError, match="history_keep has shape"):
        model.prepare(b["history"], b["reference"], b["instruction"], 0.5, training=False,
                      history_keep=~labels[:, :4])


def test_no_gradient_reaches_the_mask_generator_through_the_truth_mask(fresh, token_ds) -> None:
    b = default_collate([token_ds[i] for i in range(3)])
    model = fresh.model
    model.train()
    model.history_mode = "truth"
    try:
        inputs = model.prepare(b["history"], b["reference"], b["instruction"], 0.5, training=True,
                               generator=torch.Generator().manual_seed(0),
                               history_keep=truth_keep_mask(b["history_distractor_tokens"]))
        inputs.reference_tokens = inputs.reference_tokens.detach()
        inputs.reference_mask = inputs.reference_mask.detach()
        model.condition(inputs).pow(2).mean().backward()
        grads = [p.grad for p in model.mask_generator.parameters() if p.grad is not None]
        assert not grads or all(float(g.abs().sum()) == 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_perfect_mask_training_reads_the_datasets_labels(fresh, monkeypatch, tmp_path) -> None:
    seen = []
    real = fresh.model.prepare

    def spy(history, reference, instruction, ratio, training, generator=None, history_keep=None):
        seen.append((fresh.model.history_mode, history.clone(), history_keep))
        return real(history, reference, instruction, ratio, training, generator, history_keep)

    monkeypatch.setattr(fresh.model, "prepare", spy)
    cfg = TrainConfig(stage=1, steps=2, batch_size=2, n_users=10, save_every=1, warmup=0, regime="token",
                      noise_rates=(0.4,), perfect_mask=True)
    r = train(fresh, cfg, tmp_path / "p", progress=False, backbone="tiny")
    assert len(r.losses) == 2 and all(math.isfinite(x) for x in r.losses)
    assert fresh.model.history_mode == "mask"  # restored
    # the keep-mask of each step is the complement of the renderer's labels of the windows it drew
    from persviz.pigeon.users import make_datasets
    ds = make_datasets(10, 0, (0.4,), 12, regime="token")["train"]
    labels = {ds[i]["history"].numpy().tobytes(): ds[i]["history_distractor_tokens"] for i in range(len(ds))}
    assert len(seen) == 2
    for mode, hist, keep in seen:
        assert mode == "truth"
        want = torch.stack([labels[h.numpy().tobytes()] for h in hist])
        assert torch.equal(keep, ~want) and want.any()
    rec = json.loads((tmp_path / "p" / "config.json").read_text())
    assert rec["perfect_mask"] is True and rec["regime"] == "token"
    assert json.loads((tmp_path / "p" / CONFIG_FILE).read_text())["perfect_mask"] is True
    for bad in (dict(regime="image"), dict(stage=2, init_from="x"), dict(history_mask=False)):
        with pytest.raises(ValueError, match="perfect"):
            TrainConfig(**{"regime": "token", "perfect_mask": True, **bad})


def test_command_line_trains_the_perfect_mask_run(tmp_path) -> None:
    r = cli_main(["pigeon", "train", "--stage", "perfect", "--tiny", "--regime", "decoy", "--steps", "1",
                  "--batch-size", "2", "--n-users", "10", "--save-every", "1", "--no-progress", "--out",
                  str(tmp_path / "perfect")])
    assert r.steps == 1
    rec = json.loads((tmp_path / "perfect" / "config.json").read_text())
    assert rec["perfect_mask"] is True and rec["regime"] == "decoy" and "history_mask" not in rec


# ---------------------------------------------------------------- the decoy regime


def test_decoy_regime_changes_only_the_distractors_color_and_texture() -> None:
    token = make_users(12, seed=3, noise_rates=(0.2, 0.4), regime="token")
    decoy = make_users(12, seed=3, noise_rates=(0.2, 0.4), regime="decoy")
    styles = set()
    for t, d in zip(token, decoy):
        assert (t.taste, t.scenes, t.references, t.noise_rate) == (d.taste, d.scenes, d.references, d.noise_rate)
        assert d.regime == "decoy" and t.decoy is None and d.decoy == decoy_style(d.taste, 3, d.user_id)
        color, texture = d.decoy
        assert color in COLORS and texture in TEXTURES
        assert color not in d.taste.colors and texture != d.taste.texture
        styles.add(d.decoy)
        for pt, pd in zip(t.distractors, d.distractors):
            assert len(pt) == len(pd)
            for a, b in zip(pt, pd):
                assert (a.obj.shape, a.obj.size, a.cx, a.cy, a.radius) == (b.obj.shape, b.obj.size, b.cx, b.cy, b.radius)
                assert (b.obj.color, b.obj.texture) == d.decoy
    assert len(styles) > 3  # drawn per user
    # the renderer's labels are the token regime's: the geometry is the same
    dt, dd = PigeonDataset(token[:3], seed=3), PigeonDataset(decoy[:3], seed=3)
    for i in range(len(dt)):
        assert np.array_equal(dt.history_tokens(i), dd.history_tokens(i))
        assert np.array_equal(dt.images(i)["target"], dd.images(i)["target"])  # targets show no distractor


def test_decoy_style_never_shares_an_attribute_with_the_taste() -> None:
    for c in COLORS:
        for tx in TEXTURES:
            taste = Taste((c,), tx, "white")
            for u in range(5):
                col, tex = decoy_style(taste, 0, u)
                assert col != c and tex != tx


# ---------------------------------------------------------------- the control table


def test_control_table_pairs_its_rows_and_the_truth_mask_reads_everything_without_distractors(
        fresh, clip_eval, oracle, tmp_path) -> None:
    from persviz.loading import load_evaluator
    dino = load_evaluator(kind="dino")
    path = tmp_path / "control.json"
    rows = ctl.control_table({"perfect": fresh, "baseline": fresh, "stage1": fresh}, 2, noise_rates=(0.0, 0.4),
                             regime="token", clip=clip_eval, dino=dino, oracle=oracle, batch_size=2, path=path,
                             progress=False, n_boot=200, num_inference_steps=2)
    by = {(r["noise_rate"], r["key"]): r for r in rows}
    assert set(by) == {(x, k) for x in (0.0, 0.4) for k in ctl.CONTROL_ROWS}
    # without distractors the ground truth keeps every token: the truth rows read what the every-token rows read
    assert by[(0.0, "perfect")]["items"] == by[(0.0, "perfect_keep")]["items"]
    assert by[(0.0, "perfect")]["items"] == by[(0.0, "baseline")]["items"]
    for x in (0.0, 0.4):
        for row, ref in ctl.COMPARISONS:
            assert set(by[(x, row)][f"vs_{ref}"]) == {k for k, _, _ in st.METRICS}
        assert by[(x, "stage1")]["masks"]["n"] == 2 and "masks" not in by[(x, "perfect")]
    d = by[(0.0, "perfect")]["vs_baseline"]["any_taste"]
    assert d["mean"] == 0 and d["p"] == 1.0 and not ctl.holds(d)
    flat = ctl.comparison_rows(rows)
    assert len(flat) == 2 * len(ctl.COMPARISONS) and {f["metric"] for f in flat} == {"any_taste"}
    rec = json.loads(path.read_text())
    assert rec["settings"]["primary"] == "any_taste" and not (tmp_path / "control.json.partial").exists()
    md = ctl.format_control(rec["rows"])
    assert "perfect − baseline" in md and "| 0.4 | perfect mask (trained and read with the ground truth) |" in md
    with pytest.raises(ValueError, match="distractor tokens"):
        ctl.control_table({"perfect": fresh}, 1, regime="image", progress=False)
    with pytest.raises(ValueError, match="needs the 'stage1' model"):
        ctl.control_table({"perfect": fresh}, 1, rows=["stage1"], progress=False)


def test_holds_is_the_preregistered_criterion() -> None:
    base = {"mean": 0.1, "low": 0.02, "high": 0.2, "p": 0.001, "p_holm": 0.01}
    assert ctl.holds(base)
    assert not ctl.holds({**base, "low": -0.01})
    assert not ctl.holds({**base, "p_holm": 0.03})  # 0.05 split over the two noise rates
    assert ctl.ALPHA == 0.025
    assert not ctl.holds({**base, "mean": -0.1, "low": -0.2, "high": -0.02})
    assert not ctl.holds({**base, "p_holm": float("nan")})


def test_control_differences_draws_one_line_per_comparison_and_rate() -> None:
    from persviz.pigeon.plots import control_differences
    d = {"mean": 0.1, "low": 0.02, "high": 0.2, "p": 0.001, "p_holm": 0.01}
    rows = [{"noise_rate": x, "key": k, "vs_baseline": {"any_taste": d}, "vs_perfect": {"any_taste": d}}
            for x in (0.2, 0.4) for k in ("perfect", "stage1")]
    fig = control_differences({"token": rows, "decoy": rows})
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == 6 and "perfect − baseline @ 0.2" in ax.get_yticklabels()[0].get_text()
    assert len(ax.lines) >= 4  # one marker per comparison present (4 here: perfect−baseline, stage1−baseline x 2)

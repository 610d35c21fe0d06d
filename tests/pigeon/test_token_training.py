"""Pigeon at token-level noise on tiny random parts: the gradient reaches the mask generator through the history's
Gumbel top-k, the trained baseline (every history token, no history mask), the regime on the command line, and the
comparison with the baseline row and the mask measures. CPU, one thread, ~30 s."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from persviz.cli import main as cli_main
from persviz.pigeon import study as st
from persviz.pigeon.model import CONFIG_FILE, WEIGHTS_FILE, load_weights, tiny_pipeline
from persviz.pigeon.train import RESUME_FILE, TrainConfig, run_record, train
from persviz.pigeon.users import DEFAULT_NOISE_RATES, DEFAULT_TOKEN_NOISE_RATES, PigeonDataset, make_users
from persviz.paths import DATA_DIR

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers, numpy 2
N_USERS = 20
FAST = dict(num_inference_steps=2)


@pytest.fixture(scope="module")
def init_weights(tiny_pigeon_pipeline):
    return tiny_pigeon_pipeline.model.trainable_state_dict()


@pytest.fixture
def fresh(tiny_pigeon_pipeline, init_weights):
    """The module's tiny pipeline with its initial trainable weights, in eval and "mask" mode."""
    pipe = tiny_pigeon_pipeline
    pipe.model.load_trainable_state_dict(init_weights)
    pipe.model.eval()
    pipe.model.history_mode = "mask"
    return pipe


@pytest.fixture(scope="module")
def token_batch():
    ds = PigeonDataset(make_users(4, seed=0, noise_rates=0.4, regime="token"), seed=0)
    return default_collate([ds[i] for i in range(3)])


def _generator_grad(pipe, batch, mode: str) -> float:
    """|d loss / d mask generator| when only the history path carries gradient (the reference's tokens and mask cut)."""
    model = pipe.model
    model.train()
    model.history_mode = mode
    model.zero_grad(set_to_none=True)
    try:
        g = torch.Generator().manual_seed(0)
        inputs = model.prepare(batch["history"], batch["reference"], batch["instruction"], 0.5, training=True,
                               generator=g)
        inputs.reference_tokens = inputs.reference_tokens.detach()
        inputs.reference_mask = inputs.reference_mask.detach()
        loss = model.condition(inputs).pow(2).mean()
        loss.backward()
        return float(sum(p.grad.abs().sum() for p in model.mask_generator.parameters() if p.grad is not None))
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        model.history_mode = "mask"


def test_gradient_reaches_the_mask_generator_through_the_history_gumbel_topk(fresh, token_batch) -> None:
    assert token_batch["history_distractor_tokens"].any()
    assert _generator_grad(fresh, token_batch, "mask") > 0  # through the straight-through history mask
    assert _generator_grad(fresh, token_batch, "keep") == 0  # every history token as it is: no path to the generator


def test_one_stage1_step_on_token_noise_moves_the_mask_generator_and_its_scores(fresh, token_batch, tmp_path) -> None:
    before = {k: v for k, v in fresh.model.trainable_state_dict().items() if k.startswith("mask_generator.")}
    scores0 = st.token_scores(fresh, token_batch["history"], token_batch["reference"])
    cfg = TrainConfig(stage=1, steps=1, batch_size=2, n_users=10, warmup=0, weight_decay=0.0, regime="token",
                      noise_rates=(0.2, 0.4))
    r = train(fresh, cfg, tmp_path / "s1", progress=False, backbone="tiny")
    assert len(r.losses) == 1 and math.isfinite(r.losses[0])
    after = fresh.model.trainable_state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    # no weight decay: a parameter moves only when a gradient reached it (AdamW's first step is ~lr per entry)
    assert {"mask_generator.dense.weight", "mask_generator.encoder.layers.0.linear1.weight"} <= set(moved)
    scores1 = st.token_scores(fresh, token_batch["history"], token_batch["reference"])
    assert (scores1[:, :5] - scores0[:, :5]).abs().max() > 1e-4  # the history scores move
    rec = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert rec["regime"] == "token" and rec["noise_rates"] == [0.2, 0.4] and "history_mask" not in rec


def test_the_baseline_reads_every_history_token_and_resumes(fresh, init_weights, tmp_path) -> None:
    modes = []
    cfg = TrainConfig(stage=1, steps=2, batch_size=2, n_users=10, save_every=1, warmup=0, regime="token",
                      history_mask=False)
    train(fresh, cfg, tmp_path / "b", progress=False, backbone="tiny",
          callback=lambda k, loss: modes.append(fresh.model.history_mode))
    assert modes == ["keep", "keep"] and fresh.model.history_mode == "mask"  # restored after training
    rec = json.loads((tmp_path / "b" / "config.json").read_text())
    assert rec["history_mask"] is False and rec["noise_rates"] == list(DEFAULT_TOKEN_NOISE_RATES)
    saved = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert saved["history_mask"] is False and saved["regime"] == "token"
    w2 = fresh.model.trainable_state_dict()
    fresh.model.load_trainable_state_dict(init_weights)
    longer = train(fresh, TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path / "b", progress=False,
                   backbone="tiny")
    assert len(longer.losses) == 3  # resumed from step 2, not restarted
    assert torch.load(tmp_path / "b" / RESUME_FILE, weights_only=True)["step"] == 3
    assert not all(torch.equal(w2[k], v) for k, v in fresh.model.trainable_state_dict().items())
    with pytest.raises(ValueError, match="stage 1's losses"):
        TrainConfig(stage=2, init_from="x", history_mask=False)
    with pytest.raises(ValueError, match="regime"):
        TrainConfig(regime="tokens")


def test_shipped_runs_keep_their_settings_record() -> None:
    # the shipped stage-1 run's config.json is what run_record writes for its settings: it still resumes
    rec = json.loads((DATA_DIR / "pigeon" / "stage1" / "config.json").read_text())
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in rec.items()
              if k not in ("format", "model", "backbone")}
    assert run_record(TrainConfig(**fields)) == {k: v for k, v in rec.items() if k not in ("format", "model", "backbone")}
    assert TrainConfig().noise_rates == DEFAULT_NOISE_RATES


def test_command_line_trains_every_stage_on_token_noise(tmp_path) -> None:
    common = ["--tiny", "--regime", "token", "--steps", "1", "--batch-size", "2", "--n-users", "10", "--save-every",
              "1", "--no-progress"]
    s1 = cli_main(["pigeon", "train", "--stage", "1", "--out", str(tmp_path / "stage1"), *common])
    base = cli_main(["pigeon", "train", "--stage", "baseline", "--out", str(tmp_path / "baseline"), *common])
    common.remove("--regime")
    common.remove("token")  # stage 2 takes its stage-1 run's regime; --init defaults to the stage1 beside --out
    s2 = cli_main(["pigeon", "train", "--stage", "2", "--out", str(tmp_path / "stage2"), "--n-pairs", "2",
                   "--pair-steps", "2", *common])
    for r in (s1, base, s2):
        assert r.steps == 1 and all(math.isfinite(x) for x in r.losses)
    recs = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in ("stage1", "baseline", "stage2")}
    assert all(r["regime"] == "token" for r in recs.values())
    assert recs["baseline"]["history_mask"] is False and "history_mask" not in recs["stage1"]
    assert recs["stage2"]["init_from"] == str(tmp_path / "stage1")
    pipe = tiny_pipeline(seed=0, d_model=32)
    load_weights(pipe.model, tmp_path / "baseline")
    assert (tmp_path / "stage2" / WEIGHTS_FILE).is_file()


def test_command_line_study_passes_the_regime_and_the_baseline(monkeypatch, tmp_path, capsys) -> None:
    seen = {}
    diff = {"mean": -0.5, "low": -1.0, "high": 0.1, "p": 0.2, "p_holm": 0.4, "n_prompts": 3, "n_images": 3,
            "level": 0.95}
    iv = {"mean": 0.25, "low": 0.2, "high": 0.3, "n_prompts": 3, "n_images": 3, "level": 0.95}
    masks = {"noise_rate": 0.19, "n": 3, "intervals": {k: iv for k in st.MASK_MEASURES}}
    monkeypatch.setattr(st, "comparison_table", lambda *a, **kw: seen.update(args=a, kw=kw) or [
        {"noise_rate": 0.2, "row": "Pigeon stage 1", "key": "stage1", "n": 3, "clip_i": 1.0,
         "vs_no_mask": {"clip_i": diff}, "vs_baseline": {"clip_i": dict(diff, mean=-0.25)}, "masks": masks}])
    cli_main(["pigeon", "study", "--regime", "token", "--n-windows", "3", "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "minus trained baseline" in out and "-0.25 [-1.00, +0.10]" in out
    assert "| 0.2 | 0.190 | 3 | 0.250 [0.200, 0.300] |" in out
    token = DATA_DIR / "pigeon" / "token"
    assert seen["args"] == (str(token / "stage1"), str(token / "stage2"), 3, (0.0, 0.2, 0.4), "test")
    assert seen["kw"]["regime"] == "token" and seen["kw"]["baseline"] == str(token / "baseline")
    cli_main(["pigeon", "study", "--stage1", "s1", "--stage2", "none", "--baseline", "b", "--out",
              str(tmp_path / "c.json")])
    assert seen["args"][:2] == ("s1", None) and seen["kw"]["baseline"] == "b" and "regime" not in seen["kw"]


# ---------------------------------------------------------------- the study at token-level noise
def test_mask_measures_follow_the_scores(fresh, monkeypatch) -> None:
    ds = st.heldout_dataset(0.4, n_users=N_USERS, regime="token")
    idx = st.pick_windows(ds, 3)
    real = st.mask_measures(fresh, ds, idx, batch_size=2, n_boot=200)
    assert real["n"] == 3 and real["noise_rate"] == pytest.approx(ds.token_noise_rate(idx))
    assert real["chance"] == pytest.approx(real["noise_rate"])
    assert real["perfect"] <= real["kept_noise_share"] + 1e-12 and 0 <= real["score_auc"] <= 1
    assert real["items"]["window"] == idx and len(real["items"]["score_auc"]) == 3
    for k in ("kept_noise_share", "perfect", "chance", "score_auc"):
        iv = real["intervals"][k]
        assert iv["low"] <= real[k] + 1e-12 and real[k] <= iv["high"] + 1e-12 and iv["n_prompts"] == 3
    # planted scores that rank every distractor token last: Pigeon's mask is then the perfect one, AUC 1
    noise = torch.from_numpy(np.stack([ds.history_tokens(i) for i in idx]))
    planted = torch.cat([-noise.float() + 0.01 * torch.rand(noise.shape), torch.zeros(3, 1, 16)], 1)
    calls = iter(planted.split(2))
    monkeypatch.setattr(st, "token_scores", lambda pipe, h, r: next(calls))
    ideal = st.mask_measures(fresh, ds, idx, batch_size=2, n_boot=200)
    assert ideal["kept_noise_share"] == pytest.approx(ideal["perfect"]) and ideal["score_auc"] == 1.0
    assert ideal["perfect"] < ideal["chance"]


def test_comparison_at_token_noise_has_the_baseline_row_and_the_masks(fresh, clip_eval, oracle, tmp_path) -> None:
    from persviz.loading import load_evaluator
    dino = load_evaluator(kind="dino")
    path = tmp_path / "comparison.json"
    rows = st.comparison_table(fresh, fresh, 2, noise_rates=(0.0, 0.2), clip=clip_eval, dino=dino, oracle=oracle,
                               n_users=N_USERS, batch_size=2, path=path, progress=False, n_boot=200,
                               baseline=fresh, regime="token", **FAST)
    keys = ["no_history", "no_mask", "baseline", "stage1", "stage2"]
    assert [(r["noise_rate"], r["key"]) for r in rows] == [(x, k) for x in (0.0, 0.2) for k in keys]
    by = {(r["noise_rate"], r["key"]): r for r in rows}
    for x in (0.0, 0.2):
        # the baseline given stage 1's model reads the history as "history without masks" does: the same scores
        base, no_mask = by[(x, "baseline")], by[(x, "no_mask")]
        assert base["row"] == st.ROW_LABELS["baseline"] and base["items"] == no_mask["items"]
        assert set(base["vs_no_mask"]) == {k for k, _, _ in st.METRICS}
        for k in ("stage1", "stage2"):
            assert set(by[(x, k)]["vs_baseline"]) == set(by[(x, k)]["vs_no_mask"])
            assert by[(x, k)]["masks"]["n"] == 2
        assert "masks" not in base and "vs_baseline" not in base
    assert by[(0.0, "stage1")]["masks"]["noise_rate"] == 0.0
    assert by[(0.2, "stage1")]["masks"]["noise_rate"] == pytest.approx(0.2, abs=0.03)
    assert math.isnan(by[(0.0, "stage1")]["masks"]["score_auc"])  # no distractor token to rank against
    rec = json.loads(path.read_text())
    assert rec["settings"]["regime"] == "token" and rec["settings"]["baseline"] == "pipeline"
    md = st.format_mask_measures(rec["rows"])
    assert md.count("\n") == 3 and "perfect mask" in md and "| 0.2 |" in md
    assert "minus trained baseline" in st.format_differences(rows, against=st.TRAINED_BASELINE)
    with pytest.raises(ValueError, match="regime"):
        st.comparison_table(fresh, None, 1, regime="pixel", progress=False)

"""Pigeon's studies and explorer (persviz.pigeon.study / widgets) on the tiny random pipeline.

The rows of the comparison are checked against their definitions (no history: the output does not depend on the
history; no masks: every history token kept), the kept-noise counts against planted masks, the bad inputs through
the public entry points. CPU, one thread, ~20 s."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from persviz.pigeon import study as st
from persviz.pigeon.model import RATIOS
from persviz.pigeon.train import PAIRS_FILE
from persviz.pigeon.users import make_users, split_users
from persviz.pigeon.widgets import PigeonExplorer


pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers, numpy 2
N_USERS = 30
FAST = dict(num_inference_steps=2)


@pytest.fixture(scope="module")
def ds():
    return st.heldout_dataset(0.4, n_users=N_USERS)


@pytest.fixture(scope="module")
def batch(ds):
    return default_collate([ds[i] for i in st.pick_windows(ds, 2)])


@pytest.fixture(scope="module")
def dino():
    from persviz.loading import load_evaluator
    return load_evaluator(kind="dino")


# ---------------------------------------------------------------- data
def test_heldout_users_are_the_training_populations_test_split_all_at_one_rate(ds) -> None:
    mixed = split_users(make_users(N_USERS, seed=0, noise_rates=(0.0, 0.2, 0.4, 0.6)), seed=0)["test"]
    assert sorted(ds.users) == [u.user_id for u in mixed]
    assert all(u.noise_rate == 0.4 for u in ds.users.values())
    assert all(a.taste == ds.users[a.user_id].taste for a in mixed)  # same people, same taste
    with pytest.raises(ValueError, match="split"):
        st.heldout_dataset(0.4, split="holdout", n_users=N_USERS)


def test_pick_windows_spreads_over_users_first(ds) -> None:
    n_users = len(ds.users)
    idx = st.pick_windows(ds, n_users)
    assert sorted({ds.window(i).user_id for i in idx}) == sorted(ds.users)
    assert idx == sorted(idx) and len(set(idx)) == n_users
    with pytest.raises(ValueError, match="n_windows"):
        st.pick_windows(ds, len(ds) + 1)
    with pytest.raises(ValueError, match="positive"):
        st.pick_windows(ds, 0)


# ---------------------------------------------------------------- the rows, by definition
def test_history_modes_keep_mask_or_drop_the_history(tiny_pigeon_pipeline, batch) -> None:
    pipe = tiny_pigeon_pipeline
    model, n = pipe.model, pipe.model.config.n_tokens
    args = (batch["history"], batch["reference"], batch["instruction"], 0.5)
    kept = {}
    for mode in ("mask", "keep", "none"):
        with st.history_mode(pipe, mode):
            inputs = model.prepare(*args, training=False)
            kept[mode] = inputs.history_mask.sum(-1)
            if mode == "none":
                assert torch.count_nonzero(inputs.history_tokens) == 0
        assert model.history_mode == "mask"  # restored
    assert torch.all(kept["mask"] == int(n * (1 - model.config.history_ratio)))
    assert torch.all(kept["keep"] == n)  # history without masks: every token
    assert torch.all(kept["none"] == 0)
    with pytest.raises(ValueError, match="mode"):
        with st.history_mode(pipe, "off"):
            pass


def test_no_history_row_does_not_depend_on_the_history(tiny_pigeon_pipeline, batch) -> None:
    pipe = tiny_pigeon_pipeline
    other = batch["history"].flip(0)  # each request gets the other one's history
    h, r, t = batch["history"], batch["reference"], batch["instruction"]
    with st.history_mode(pipe, "none"):
        a = pipe.candidates(h, r, t, generator=0, **FAST)
        b = pipe.candidates(other, r, t, generator=0, **FAST)
    assert torch.equal(a, b)
    c = pipe.candidates(h, r, t, generator=0, **FAST)
    d = pipe.candidates(other, r, t, generator=0, **FAST)
    assert not torch.equal(c, d)  # while Pigeon reads it


def test_token_scores_give_the_mask_prepare_uses(tiny_pigeon_pipeline, batch) -> None:
    pipe = tiny_pigeon_pipeline
    pipe.model.eval()  # as PigeonPipeline.__call__ runs it (token_scores always scores without dropout)
    for mode in ("mask", "keep", "none"):
        with st.history_mode(pipe, mode):
            scores = st.token_scores(pipe, batch["history"], batch["reference"])
            inputs = pipe.model.prepare(batch["history"], batch["reference"], batch["instruction"], 0.5,
                                        training=False)
            assert scores.shape == (2, 6, pipe.model.config.n_tokens)
            assert torch.equal(st.history_keep_mask(pipe, scores), inputs.history_mask.detach())


# ---------------------------------------------------------------- kept noise, hand-computed
def test_noise_fraction_on_a_planted_mask() -> None:
    keep = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 0]]], dtype=torch.float32)  # 2 kept in the noise image, 3 else
    noise = torch.tensor([[True, False]])
    kept, chance = st.noise_fraction(keep, noise)
    assert kept == pytest.approx(2 / 5) and chance == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no token"):
        st.noise_fraction(torch.zeros(1, 2, 4), noise)
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        st.noise_fraction(keep, torch.tensor([True, False]))


def test_pooled_mask_and_auc_on_planted_scores() -> None:
    scores = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]])  # the noise image (0) scores lower
    noise = torch.tensor([[True, False]])
    pooled = st.pooled_keep_mask(scores, 0.5)  # keeps the top 4 of 8: all of image 1
    assert pooled.tolist() == [[[0, 0, 0, 0], [1, 1, 1, 1]]]
    assert st.noise_fraction(pooled, noise)[0] == 0.0
    assert st.score_auc(scores, noise) == 1.0
    assert st.score_auc(scores, torch.tensor([[False, True]])) == 0.0
    assert st.score_auc(torch.zeros(1, 2, 4), noise) == 0.5  # ties
    assert np.isnan(st.score_auc(scores, torch.tensor([[False, False]])))


def test_kept_noise_fraction_per_image_mask_sits_at_chance(tiny_pigeon_pipeline, ds) -> None:
    pipe = tiny_pigeon_pipeline
    out = st.kept_noise_fraction(pipe, ds, 4)
    assert out["n"] == 4 and out["noise_rate"] == pytest.approx(0.4)
    assert out["chance"] == pytest.approx(0.4)
    assert out["kept_noise_fraction"] == pytest.approx(0.4)  # the same number of tokens kept in every image
    assert 0.0 <= out["pooled_kept_noise_fraction"] <= 1.0 and 0.0 <= out["score_auc"] <= 1.0
    rates = st.kept_noise_by_rate(pipe, 2, noise_rates=(0.0, 0.2), n_users=N_USERS, progress=False)
    assert [r["noise_rate"] for r in rates] == [0.0, 0.2]
    assert rates[0]["kept_noise_fraction"] == 0.0 and rates[1]["chance"] == pytest.approx(0.2)


# ---------------------------------------------------------------- the comparison table
def test_comparison_table_rows_metrics_and_json(tiny_pigeon_pipeline, clip_eval, dino, oracle, tmp_path) -> None:
    pipe = tiny_pigeon_pipeline
    path = tmp_path / "sub" / "comparison.json"
    rows = st.comparison_table(pipe, pipe, 2, noise_rates=(0.0, 0.4), clip=clip_eval, dino=dino, oracle=oracle,
                               n_users=N_USERS, batch_size=2, path=path, progress=False, **FAST)
    assert [(r["noise_rate"], r["key"]) for r in rows] == [(x, k) for x in (0.0, 0.4) for k in st.ROWS]
    for r in rows:
        assert r["row"] == st.ROWS[r["key"]] and r["n"] == 2
        assert sum(r["ratio_counts"].values()) == 2 and list(r["ratio_counts"]) == [f"{x:g}" for x in RATIOS]
        for k, _, _ in st.METRICS:
            assert np.isfinite(r[k]), k
        assert all(0.0 <= r[k] <= 1.0 for k in ("taste", "shape", "color"))
    by = {(r["noise_rate"], r["key"]): r for r in rows}
    for x in (0.0, 0.4):  # stage 2 given the same model: the same latents give the same numbers
        s1, s2 = by[(x, "stage1")], by[(x, "stage2")]
        assert {k: s1[k] for k in s1 if k not in ("row", "key")} == {k: s2[k] for k in s2 if k not in ("row", "key")}
    loaded, settings = st.load_comparison(path)
    assert len(loaded) == len(rows) and settings["n_users"] == N_USERS and settings["stage1"] == "pipeline"
    assert json.loads(path.read_text())["rows"][0]["key"] == "no_history"
    md = st.format_table(loaded)
    assert md.count("\n") == len(rows) + 1 and "Pigeon stage 2" in md and "history without masks" in md
    no2 = st.comparison_table(pipe, None, 1, noise_rates=(0.2,), clip=clip_eval, dino=dino, oracle=oracle,
                              n_users=N_USERS, progress=False, **FAST)
    assert [r["key"] for r in no2] == ["no_history", "no_mask", "stage1"]


def test_stage_loading_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="persviz.pigeon.train"):
        st.load_stage(tmp_path / "missing", name="stage2")
    with pytest.raises(FileNotFoundError, match="comparison_table"):
        st.load_comparison(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a comparison table"):
        st.load_comparison(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no rows"):
        st.format_table([])
    for kw, msg in ((dict(n_windows=0), "n_windows"), (dict(n_windows=2, batch_size=0), "batch_size"),
                    (dict(n_windows=2, noise_rates=()), "noise_rates is empty")):
        with pytest.raises(ValueError, match=msg):
            st.comparison_table(tmp_path, None, **kw)
    with pytest.raises(st.FullScaleNotSupportedError, match="LaVIT"):
        st.require_shapesworld("full")
    st.require_shapesworld("shapesworld")
    monkeypatch.setenv("PERSVIZ_SCALE", "full")  # an exported scale does not leak into the library: ShapesWorld still
    with pytest.raises(FileNotFoundError, match="persviz pigeon train"):
        st.comparison_table(tmp_path, None, 1, progress=False)


# ---------------------------------------------------------------- bad inputs through the public entry points
def test_bad_requests_fail_with_the_fix(tiny_pigeon_pipeline, ds) -> None:
    pipe = tiny_pigeon_pipeline
    item = ds[0]
    h, r, t = item["history"], item["reference"], item["instruction"]
    with pytest.raises(ValueError, match="exactly 5"):
        pipe.select(h[:4], r, t, **FAST)
    with pytest.raises(ValueError, match="exactly 5"):
        st.token_scores(pipe, h[:3], r)
    small = torch.nn.functional.interpolate(h, size=(16, 16))
    with pytest.raises(ValueError, match="16x16.*resize"):
        pipe.select(small, r, t, **FAST)
    with pytest.raises(ValueError, match="16x16.*resize"):
        st.reference_masks(pipe, h, r[:, :16, :16], t)
    with pytest.raises(ValueError, match="empty"):
        pipe.select(h, r, "  ", **FAST)
    with pytest.raises(ValueError, match="empty"):
        st.reference_masks(pipe, h, r, "")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        pipe(h, r, t, reference_ratio=1.5, **FAST)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        pipe.select(h, r, t, ratios=(0.0, -0.25), **FAST)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        st.window_masks(pipe, ds, 0, reference_ratio=2.0)


# ---------------------------------------------------------------- stage-2 pairs
def test_pair_examples_read_pairs_pt(tiny_pigeon_pipeline, tmp_path) -> None:
    pipe = tiny_pigeon_pipeline
    with pytest.raises(FileNotFoundError, match="stage 2"):
        st.load_pairs(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_users": 20, "data_seed": 0, "noise_rates": [0.2, 0.4],
                                                      "n_interactions": 12, "ratios": [0.0, 0.5, 1.0]}))
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [0.0, 1.0, 4.0]])
    state = {"done": 3, "window": [torch.tensor([0, 1]), torch.tensor([2])],
             "chosen": [torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)],
             "rejected": [torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)],
             "chosen_ratio": [scores[:2].argmax(1), scores[2:].argmax(1)],
             "rejected_ratio": [torch.tensor([0, 0]), scores[2:].argmin(1)],
             "scores": [scores[:2], scores[2:]]}
    torch.save(state, tmp_path / PAIRS_FILE)
    assert st.load_pairs(tmp_path)["chosen"].shape == (3, 4, 16, 16)
    ex = st.pair_examples(pipe, tmp_path, n=5)
    assert len(ex) == 2  # the tie (window 1) is left out
    assert (ex[0]["chosen_ratio"], ex[0]["rejected_ratio"]) == (0.5, 0.0)
    assert (ex[0]["chosen_score"], ex[0]["rejected_score"]) == (3.0, 1.0)
    assert (ex[1]["chosen_ratio"], ex[1]["rejected_ratio"]) == (1.0, 0.0)
    assert ex[0]["history"].shape == (5, 32, 32, 3) and ex[0]["chosen"].shape == (32, 32, 3)
    assert ex[0]["chosen"].dtype == np.uint8 and ex[0]["history_is_noise"].shape == (5,)


# ---------------------------------------------------------------- the explorer, driven headless
def test_explorer_callbacks(tiny_pigeon_pipeline, ds) -> None:
    pipe = tiny_pigeon_pipeline
    ex = PigeonExplorer(pipe, ds, num_inference_steps=2)
    assert ex.history_image.value and ex.masks is not None and ex.error is None
    assert ex.shown is None and "press generate" in ex.message.value and not ex.sweep_image.value
    users = [v for _, v in ex.user.options]
    ex.user.value = users[1]
    assert all(ds.window(i).user_id == users[1] for _, i in ex.window.options)
    assert ex.masks["window"].user_id == users[1]  # the history was redrawn for the new user
    ex.button.click()
    assert ex.error is None, ex.error
    sel = ex.last["selection"]
    assert sel.candidates.shape[:2] == (1, len(RATIOS))
    assert ex.last["selected_ratio"] == RATIOS[sel.ratio_index[0]]
    assert ex.last["reference_masks"].sum(1).tolist() == [16, 12, 8, 4, 1]
    assert "selected" in ex.scores.value and ex.sweep_image.value
    assert ex.shown["window"] == ex.window.value and ex.sweep_image.layout.display is None
    first_png = ex.sweep_image.value
    # another seed: the generations stay, marked stale, until generate; the same seed again makes them current
    ex.seed.value = 3
    assert ex.stale and "for seed 0; press generate for seed 3" in ex.message.value and ex.sweep_image.value
    assert "#b00020" not in ex.message.value  # a notice, not an error's red
    ex.seed.value = 0
    assert not ex.stale and "selected ratio" in ex.message.value
    # another window of the same user: its history at once, the previous window's generations and scores cleared
    windows = [i for _, i in ex.window.options]
    assert len(windows) > 1
    ex.window.value = windows[1]
    assert ex.masks["window"] == ds.window(windows[1]) and ex.shown is None
    assert ex.sweep_image.value == b"" and ex.sweep_image.layout.display == "none" and ex.scores.value == ""
    assert "press generate" in ex.message.value and ex.error is None
    ex.button.click()  # generate again: the new window's generations
    assert ex.shown["window"] == windows[1] and ex.last["window"] == windows[1]
    assert ex.sweep_image.value and ex.sweep_image.value != first_png
    item = ds[windows[1]]
    ref = pipe.select(item["history"], item["reference"], item["instruction"], ratios=RATIOS, generator=0,
                      num_inference_steps=2)
    assert torch.equal(ref.candidates, ex.last["selection"].candidates)  # the images are this window's
    # another user: the same
    ex.user.value = users[2]
    assert ex.shown is None and ex.sweep_image.value == b"" and ex.scores.value == ""
    assert ex.masks["window"].user_id == users[2]
    ex.seed.value = -1
    assert ex.update() is False and "seed" in ex.error
    ex.seed.value = 0
    ex.pipe = None  # a failing callback is shown, not raised
    assert ex.update() is False and "error" in ex.message.value
    with pytest.raises(ValueError, match="PigeonDataset"):
        PigeonExplorer(pipe, [])


def test_shipped_pairs_sample_is_read_when_pairs_pt_is_absent(tmp_path) -> None:
    import shutil

    from persviz.paths import DATA_DIR
    from persviz.pigeon.study import PAIRS_SAMPLE_FILE, load_pairs

    with pytest.raises(FileNotFoundError, match="pairs.pt"):
        load_pairs(tmp_path)
    shutil.copy(DATA_DIR / "pigeon" / "stage2" / PAIRS_SAMPLE_FILE, tmp_path / PAIRS_SAMPLE_FILE)
    pairs = load_pairs(tmp_path)
    n = pairs["done"]
    assert n == 16 and pairs["chosen"].shape == pairs["rejected"].shape and len(pairs["window"]) == n
    # chosen is the best history score of its candidates, rejected the worst
    ar = torch.arange(n)
    assert torch.equal(pairs["scores"][ar, pairs["chosen_ratio"]], pairs["scores"].max(1).values)
    assert torch.equal(pairs["scores"][ar, pairs["rejected_ratio"]], pairs["scores"].min(1).values)


# ---------------------------------------------------------------- intervals and paired differences
def _item_rows(n=12, seed=0):
    """Synthetic comparison rows with per-window scores: stage 1 = no mask + 2 on CLIP-I, stage 2 = no mask."""
    rng = np.random.default_rng(seed)
    base = {"clip_i": rng.normal(40, 5, n), "taste": (rng.random(n) < 0.5).astype(float)}
    shift = {"no_history": {"clip_i": -30.0, "taste": 0.0}, "no_mask": {"clip_i": 0.0, "taste": 0.0},
             "stage1": {"clip_i": 2.0, "taste": 0.0}, "stage2": {"clip_i": 0.0, "taste": 0.0}}
    rows = []
    for key, label in st.ROWS.items():
        items = {"window": list(range(n)), **{k: (v + shift[key][k]).tolist() for k, v in base.items()}}
        rows.append({"noise_rate": 0.2, "row": label, "key": key, "n": n,
                     **{k: float(np.mean(v)) for k, v in base.items()}, "items": items})
        for k in base:
            rows[-1][k] += shift[key][k]
    return rows


def test_intervals_and_paired_differences_match_persviz_stats() -> None:
    from persviz.stats import bootstrap_mean, holm_table, paired_difference
    rows = st.paired_differences(st.with_intervals(_item_rows()))
    by = {r["key"]: r for r in rows}
    for r in rows:
        for k in ("clip_i", "taste"):
            iv = r["intervals"][k]
            assert iv["low"] <= r[k] <= iv["high"] and iv["n_prompts"] == 12 and iv["n_images"] == 12
            ref = bootstrap_mean(np.array(r["items"][k])[:, None])
            assert iv == ref.to_json() and iv["mean"] == pytest.approx(r[k])
        assert set(r["intervals"]) == {"clip_i", "taste"}  # only the metrics with per-window scores
    assert "vs_no_mask" not in by["no_history"] and "vs_no_mask" not in by["no_mask"]
    d1 = by["stage1"]["vs_no_mask"]
    assert d1["clip_i"]["mean"] == pytest.approx(2.0) and d1["clip_i"]["low"] == pytest.approx(2.0)
    assert d1["taste"]["mean"] == 0.0 and d1["taste"]["p"] == 1.0
    want = holm_table({k: paired_difference(np.array(by["no_mask"]["items"][k])[:, None],
                                            np.array(by["stage2"]["items"][k])[:, None]) for k in ("clip_i", "taste")})
    assert by["stage2"]["vs_no_mask"] == {k: d.to_json() for k, d in want.items()}
    md = st.format_table(rows, ["clip_i", "taste"])
    iv = by["stage1"]["intervals"]["clip_i"]
    assert f"{by['stage1']['clip_i']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]" in md
    assert md.count("\n") == len(rows) + 1
    diff_md = st.format_differences(rows, ["clip_i", "taste"])
    assert diff_md.count("\n") == 3 and "+2.00 [+2.00, +2.00]" in diff_md and "Holm" in diff_md
    # files without per-window scores: SEMs as before, no differences
    old = [{k: v for k, v in r.items() if k not in ("items", "intervals", "vs_no_mask")} | {"clip_i_sem": 0.5}
           for r in _item_rows()]
    assert "± 0.50" in st.format_table(st.with_intervals(old), ["clip_i"])
    with pytest.raises(ValueError, match="paired_differences"):
        st.format_differences(st.paired_differences(old))
    bad = _item_rows()
    bad[3]["items"]["window"] = list(range(1, 13))
    with pytest.raises(ValueError, match="different windows"):
        st.paired_differences(bad)


def test_comparison_table_stores_per_window_scores_and_resumes(tiny_pigeon_pipeline, clip_eval, dino, oracle,
                                                               tmp_path) -> None:
    pipe = tiny_pigeon_pipeline
    path = tmp_path / "comparison.json"
    kw = dict(noise_rates=(0.4,), clip=clip_eval, dino=dino, oracle=oracle, n_users=N_USERS, batch_size=2,
              path=path, progress=False, n_boot=500, **FAST)
    rows = st.comparison_table(pipe, pipe, 3, **kw)
    assert not path.with_name(path.name + ".partial").exists()  # removed once the table is written
    for r in rows:
        assert len(r["items"]["window"]) == 3
        for k, _, _ in st.METRICS:
            assert np.mean(r["items"][k]) == pytest.approx(r[k])
            assert r["intervals"][k]["low"] <= r[k] <= r["intervals"][k]["high"]
    assert set(rows[-1]["vs_no_mask"]) == {k for k, _, _ in st.METRICS}
    assert json.loads(path.read_text())["settings"]["n_boot"] == 500
    # an interrupted run's finished blocks are reused when the settings match (planted: a marked first block)
    marked = dict(rows[0], clip_i=123.0)
    settings = {k: v for k, v in json.loads(path.read_text())["settings"].items()
                if k not in ("n_boot", "level", "intervals")}
    key = json.dumps({**settings, "weights": [None, None]})
    path.with_name(path.name + ".partial").write_text(json.dumps({"key": key, "rows": [marked]}))
    again = st.comparison_table(pipe, pipe, 3, **kw)
    assert again[0]["clip_i"] == 123.0 and again[1]["clip_i"] == rows[1]["clip_i"]

"""persviz.pigeon.plots: every figure returns its Figure, draws on the given axes and leaves matplotlib's global
state alone; the token overlay shades exactly the masked patches. Synthetic inputs, no model, ~2 s."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from persviz.pigeon import plots as pp  # noqa: E402
from persviz.pigeon.study import ROWS  # noqa: E402

from tests.helpers import new_ax  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_global_matplotlib_state")

RNG = np.random.default_rng(0)
H, N, S = 5, 16, 32


def _images(n):
    return RNG.integers(0, 256, size=(n, S, S, 3), dtype=np.uint8)


def _selection():
    r = (0.0, 0.25, 0.5, 0.75, 1.0)
    return SimpleNamespace(candidates=torch.rand(2, len(r), 3, S, S), ratios=r, ratio_index=[2, 0],
                           clip_t=torch.rand(2, len(r)) * 60, history_score=torch.rand(2, len(r)) * 20)


def _rows():
    out = []
    for x in (0.0, 0.2, 0.4):
        for i, (k, label) in enumerate(ROWS.items()):
            out.append({"noise_rate": x, "row": label, "key": k, "n": 8, "clip_i": 10 + i, "clip_i_sem": 0.5,
                        "dino_i": 20 + i, "dino_i_sem": 1.0, "taste": 0.1 * i, "clip_t": 50 - i, "clip_t_sem": 0.3,
                        "shape": 0.9 - 0.1 * i})
    return out


def test_token_overlay_shades_only_masked_patches() -> None:
    img = np.full((S, S, 3), 200, np.uint8)
    keep = np.ones(N)
    keep[5] = 0  # patch (row 1, col 1): pixels 8..15 x 8..15
    out = pp.token_overlay(img, keep, frame=(255, 0, 0), scale=1, border=2)
    assert out.shape == (S + 4, S + 4, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)  # the frame
    inner = out[2:-2, 2:-2].astype(int)
    assert inner[9:15, 9:15].mean() < 120  # the masked patch is dark
    assert (inner[1:7, 1:7] == 200).all() and (inner[17:23, 25:31] == 200).all()  # kept patches untouched
    assert pp.token_overlay(img, None, scale=2, border=0).shape == (2 * S, 2 * S, 3)
    with pytest.raises(ValueError, match="square patch grid"):
        pp.token_overlay(img, np.ones(15))


def test_mask_overlay_on_given_ax_and_alone() -> None:
    hist, ref = _images(H), _images(1)[0]
    hm = (RNG.random((H, N)) > 0.3).astype(float)
    noise = np.array([False, True, False, True, False])
    fig, ax = new_ax()
    assert pp.mask_overlay(hist, ref, hm, hm[0], noise, RNG.normal(size=(H + 1, N)), title="a triangle", ax=ax) is fig
    texts = " ".join(t.get_text() for t in ax.texts)
    assert texts.count("noise") == 2 and f"{int((hm[0] >= 0.5).sum())}/16 kept" in texts
    assert isinstance(pp.mask_overlay(hist, ref, hm), Figure)
    with pytest.raises(ValueError, match="history_mask"):
        pp.mask_overlay(hist, ref, hm[:3])
    with pytest.raises(ValueError, match="scores"):
        pp.mask_overlay(hist, ref, hm, scores=np.zeros((H, N)))


def test_truth_overlay_tints_exactly_the_marked_patches() -> None:
    img = np.full((S, S, 3), 200, np.uint8)
    marked = np.zeros(N, bool)
    marked[5] = True  # row 1, column 1 of the 4 x 4 grid: pixels 8..15 of the 32-pixel image
    out = pp.truth_overlay(img, marked, (255, 0, 0), scale=1, border=0)
    expected = 0.45 * 200 + 0.55 * np.array([255, 0, 0])  # the blend, by hand
    assert np.abs(out[10:14, 10:14].astype(float) - expected).max() <= 1
    assert (out[1:7, 1:7] == 200).all() and (out[17:23, 25:31] == 200).all()  # unmarked patches untouched
    with pytest.raises(ValueError, match="square patch grid"):
        pp.truth_overlay(img, np.ones(15, bool))


def test_mask_overlay_draws_the_ground_truth_and_counts_the_kept_distractors() -> None:
    hist, ref = _images(H), _images(1)[0]
    hm = np.ones((H, N))
    hm[0, :3] = 0  # image 1 drops tokens 0, 1, 2
    truth = np.zeros((H, N), bool)
    truth[0, 1:5] = True  # 4 distractor tokens in image 1, of which the mask keeps 3 and 4 (2 of 4)
    fig, ax = new_ax()
    assert pp.mask_overlay(hist, ref, hm, distractor_tokens=truth, ax=ax) is fig
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "13/16 kept, 2/4 distr." in texts and "16/16 kept, 0/0 distr." in texts and "ground" in texts
    with pytest.raises(ValueError, match="distractor_tokens"):
        pp.mask_overlay(hist, ref, hm, distractor_tokens=truth[:, :8])


def test_ratio_sweep_marks_the_selected_ratio() -> None:
    sel = _selection()
    fig, ax = new_ax()
    assert pp.ratio_sweep(sel, index=1, ax=ax) is fig
    selected = [t.get_text() for t in ax.texts if "selected" in t.get_text()]
    assert len(selected) == 1 and selected[0].startswith("ratio 0\n")
    masks = np.ones((5, N))
    assert isinstance(pp.ratio_sweep(sel, 0, reference=_images(1)[0], reference_masks=masks), Figure)
    with pytest.raises(ValueError, match="one per ratio"):
        pp.ratio_sweep(sel, 0, reference=_images(1)[0], reference_masks=masks[:2])


def test_pairs_plot() -> None:
    w = SimpleNamespace(taste=SimpleNamespace(describe=lambda: "red, striped, on a navy background"),
                        instruction="a triangle")
    ex = [{"window": w, "history": _images(H), "history_is_noise": np.array([0, 1, 0, 0, 0], bool),
           "chosen": _images(1)[0], "rejected": _images(1)[0], "chosen_ratio": 0.5, "rejected_ratio": 1.0,
           "chosen_score": 20.0, "rejected_score": 12.5}] * 2
    fig, ax = new_ax()
    assert pp.pairs_plot(ex, ax=ax) is fig
    assert sum("chosen r=0.5" in t.get_text() for t in ax.texts) == 2
    with pytest.raises(ValueError, match="no pairs"):
        pp.pairs_plot([])


def test_kept_noise_plot_has_the_chance_line() -> None:
    res = [{"noise_rate": x, "kept_noise_fraction": x, "chance": x, "pooled_kept_noise_fraction": 0.8 * x,
            "score_auc": float("nan") if x == 0 else 0.6} for x in (0.0, 0.2, 0.4, 0.6)]
    fig, ax = new_ax()
    assert pp.kept_noise_plot(res, ax=ax) is fig
    assert len(ax.lines) == 3 and any("chance" in t.get_text() for t in ax.get_legend().get_texts())
    assert sum(t.get_text().startswith("AUC") for t in ax.texts) == 3
    with pytest.raises(ValueError, match="kept_noise_by_rate"):
        pp.kept_noise_plot([])


def test_comparison_bars_one_panel_per_metric() -> None:
    rows = _rows()
    fig = pp.comparison_bars(rows)
    assert isinstance(fig, Figure) and len(fig.axes) == len(pp.DEFAULT_BAR_METRICS)
    assert len(fig.axes[0].patches) == 3 * len(ROWS)  # noise rates x rows
    fig2 = Figure()
    axes = fig2.subplots(1, 2)
    assert pp.comparison_bars(rows, metrics=("clip_t", "shape"), axes=axes) is fig2
    assert axes[1].get_ylim() == (0, 1.05)
    with pytest.raises(ValueError, match="one axes per metric"):
        pp.comparison_bars(rows, metrics=("clip_t",), axes=axes)
    with pytest.raises(ValueError, match="no rows"):
        pp.comparison_bars([])


def test_comparison_bars_draw_the_bootstrap_intervals() -> None:
    rows = _rows()
    for r in rows:
        r["intervals"] = {"clip_i": {"mean": r["clip_i"], "low": r["clip_i"] - 1.0, "high": r["clip_i"] + 3.0}}
    fig, ax = new_ax()
    pp.comparison_bars(rows, metrics=("clip_i",), axes=[ax])
    spans = []
    for c in [c for c in ax.containers if getattr(c, "errorbar", None) is not None]:  # bars, not their error bars
        (segments,) = [lc.get_segments() for lc in c.errorbar.lines[2]]
        spans += [(s[0][1], s[1][1]) for s in segments]
    want = [(r["clip_i"] - 1.0, r["clip_i"] + 3.0) for name in ROWS.values() for r in rows if r["row"] == name]
    np.testing.assert_allclose(sorted(spans), sorted(want))
    fig, ax = new_ax()  # without intervals: the SEMs, as before
    pp.comparison_bars(_rows(), metrics=("clip_i",), axes=[ax])
    first = next(c for c in ax.containers if getattr(c, "errorbar", None) is not None)
    (segments,) = [lc.get_segments() for lc in first.errorbar.lines[2]]
    np.testing.assert_allclose([s[1][1] - s[0][1] for s in segments], 1.0)

"""persviz.tea.plots: figures drawn on given axes without global state (the explorers: test_widgets.py)."""
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from persviz.tea import plots as tp  # noqa: E402

from tests.helpers import new_ax  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_global_matplotlib_state")

STEPS = [100, 200, 300, 400, 500]
ROT = [0.0, 0.1, 0.2, 0.3]
SCA = [0.0, 0.5, 1.0]


def _curves(n=len(STEPS)):
    x = np.linspace(0, 1, n)
    return {"inter d(P_V*, P_c)": 1 + x, "intra d(P_V*)": 2 - x, "d(P_V*, P_simple)": 1.5 - 0.5 * x}


def _sweep():
    return np.arange(len(ROT) * len(SCA), dtype=float).reshape(len(ROT), len(SCA))


# ----------------------------------------------------------------------------- plots: drawn on the given ax

PLOTS = {
    "norm_histogram": (lambda ax: tp.norm_histogram(np.linspace(0.2, 0.6, 500), {100: 0.5, 300: 0.9, 500: 1.4},
                                                   class_norm=0.4, ax=ax, bins=20)),
    "shift_curves": lambda ax: tp.shift_curves(STEPS, _curves(), ax=ax, title="L2"),
    "norm_ratio_curve": lambda ax: tp.norm_ratio_curve(STEPS, [1, 1.5, 2, 2.5, 3], [0.9, 0.7, 0.5, 0.4, 0.3], ax=ax),
    "impact_curves": lambda ax: tp.impact_curves(STEPS, {"CLIP-T context": [30, 28, 26, 24, 22],
                                                         "CLIP-T concept": [20, 22, 24, 25, 26],
                                                         "CLIP-I": [60, 70, 75, 78, 80]},
                                                 reference={"CLIP-T context": 31.0}, ax=ax),
    "impact_curves_bands": lambda ax: tp.impact_curves(STEPS, {"leak": [0.8, 0.7, 0.7, 0.6, 0.6]},
                                                       bands={"leak": ([0.7] * 5, [0.9] * 5)},
                                                       reference={"leak": 0.8}, reference_bands={"leak": (0.75, 0.85)},
                                                       ax=ax),
    "dominance_plot": lambda ax: tp.dominance_plot(STEPS, [80, 75, 70, 65, 60], [50, 60, 70, 75, 80], ("dog", "cat"), ax=ax),
    "sweep_heatmap": lambda ax: tp.sweep_heatmap(ROT, SCA, _sweep(), "CLIP-T", ax=ax),
    "sweep_lines": lambda ax: tp.sweep_lines(ROT, SCA, _sweep(), "CLIP-T", x="rotation", ax=ax),
    "before_after_grid": lambda ax: tp.before_after_grid(np.zeros((3, 8, 8, 3), np.uint8), np.full((3, 8, 8, 3), 255, np.uint8),
                                                         ["a sks dog", "a sks dog on a beach", "a sks dog in the snow"], ax=ax),
}


def _count(fig, ax):
    return {"lines": len(ax.lines), "patches": len(ax.patches), "texts": len(ax.texts), "images": len(ax.images),
            "collections": len(ax.collections), "axes": len(fig.axes),
            "legend": len(ax.get_legend().get_texts()) if ax.get_legend() else 0}


EXPECTED = {
    "norm_histogram": {"lines": 4, "patches": 20, "legend": 5, "axes": 1},
    "shift_curves": {"lines": 3, "legend": 3, "axes": 1},
    "norm_ratio_curve": {"lines": 2, "legend": 2, "axes": 2},  # ratio + ratio=1 line; cosine on the twin axis
    "impact_curves": {"lines": 4, "legend": 3, "axes": 1},  # 3 series + 1 reference line
    "impact_curves_bands": {"lines": 2, "legend": 1, "axes": 1, "collections": 1, "patches": 1},  # band, ref span
    "dominance_plot": {"lines": 2, "collections": 1, "legend": 2, "axes": 1},
    "sweep_heatmap": {"images": 1, "texts": len(ROT) * len(SCA), "axes": 2},  # + colorbar
    "sweep_lines": {"lines": len(SCA), "legend": len(SCA), "axes": 1},
    "before_after_grid": {"images": 1, "axes": 1},
}


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_draws_on_given_ax_and_returns_its_figure(name):
    fig, ax = new_ax()
    out = PLOTS[name](ax)
    assert out is fig
    got = _count(fig, ax)
    assert {k: got[k] for k in EXPECTED[name]} == EXPECTED[name]
    out.savefig(io.BytesIO(), format="png", dpi=40)  # renders without error


@pytest.mark.parametrize("name", ["norm_histogram", "shift_curves", "sweep_heatmap"])
def test_plot_builds_its_own_figure_without_pyplot(name):
    fig = PLOTS[name](None)
    assert isinstance(fig, Figure) and fig.canvas.manager is None
    fig.savefig(io.BytesIO(), format="png", dpi=40)


def test_norm_histogram_details():
    norms = np.linspace(0.2, 0.6, 500)
    fig, ax = new_ax()
    tp.norm_histogram(norms, {i * 100: 0.3 + 0.1 * i for i in range(1, 13)}, class_norm=0.4, ax=ax)
    assert len(fig.axes) == 2  # many steps: a colorbar over steps instead of a legend entry per step
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1].startswith("|c|=0.4")
    assert ax.get_xlim()[1] >= 1.5  # the last mark (1.5) lies in the view
    fig, ax = new_ax()
    tp.norm_histogram(torch.tensor(norms), {"final": 0.55, "init": 0.3}, ax=ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1].startswith("final: |V*|=0.55") and "p87" in labels[1]  # percentile in the vocabulary
    assert labels[2].startswith("init")  # label keys keep their order
    fig, ax = new_ax()
    tp.norm_histogram(np.linspace(0.2, 0.6, 5000), {2000: 0.59995, 3000: 0.7}, ax=ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1:] == ["step 2000: |V*|=0.6 (1 row larger)", "step 3000: |V*|=0.7 (0 rows larger)"]  # far tail


def test_before_after_grid_keeps_long_prompts_in_its_own_figure():
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    fig = tp.before_after_grid(imgs, imgs, ["a photo of sks dog on a beach at sunset, oil painting", "x"])
    fig.savefig(io.BytesIO(), format="png", dpi=50)
    assert fig.axes[0].get_tightbbox().x0 >= 0  # the wrapped row label is not cut at the left edge


def test_shift_grid_one_panel_per_metric():
    results = {m: _curves() for m in ("L2", "Hausdorff", "Mahalanobis", "KL")}
    fig = tp.shift_grid(STEPS, results, title="semantic shift")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert [a.get_title() for a in fig.axes] == list(results)
    assert all(len(a.lines) == 3 for a in fig.axes)
    assert fig.axes[0].get_legend() is not None and fig.axes[1].get_legend() is None
    host = Figure()
    axes = [host.add_subplot(1, 4, i + 1) for i in range(4)]
    assert tp.shift_grid(STEPS, results, axes=axes) is host
    with pytest.raises(ValueError, match="one Axes per metric"):
        tp.shift_grid(STEPS, results, axes=axes[:2])


def test_sweep_lines_over_scale_and_before_after_layout():
    fig, ax = new_ax()
    tp.sweep_lines(ROT, SCA, _sweep(), "CLIP-I", x="scale", ax=ax)
    assert len(ax.lines) == len(ROT)
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), _sweep()[1])
    fig, ax = new_ax()
    tp.before_after_grid(np.zeros((3, 8, 8, 3), np.uint8), np.full((3, 8, 8, 3), 255, np.uint8), ["p1", "p2", "p3"], ax=ax)
    canvas = ax.images[0].get_array()
    assert canvas.shape == (3 * 9 - 1, 2 * 9 - 1, 3)
    assert canvas[0, 0].tolist() == [0, 0, 0] and canvas[0, 9].tolist() == [255, 255, 255]  # before | after
    assert [t.get_text() for t in ax.get_yticklabels()] == ["p1", "p2", "p3"]


BAD = {
    "shift_curves": (lambda: tp.shift_curves(STEPS, {"a": [1, 2, 3]}), "3 values but there are 5 steps"),
    "shift_grid": (lambda: tp.shift_grid(STEPS, {"L2": _curves(), "KL": _curves(4)}), "4 values but there are 5 steps"),
    "norm_ratio_curve": (lambda: tp.norm_ratio_curve(STEPS, [1, 2, 3, 4, 5], [1, 2]), "cosine has 2 values"),
    "impact_curves": (lambda: tp.impact_curves(STEPS, {"CLIP-I": [1] * 6}), "6 values but there are 5 steps"),
    "impact_curves_ref": (lambda: tp.impact_curves(STEPS, {"CLIP-I": [1] * 5}, reference={"x": 1}), "not series"),
    "impact_curves_band": (lambda: tp.impact_curves(STEPS, {"CLIP-I": [1] * 5}, bands={"CLIP-I": ([0] * 4, [2] * 4)}),
                           "4 values"),
    "impact_curves_band_name": (lambda: tp.impact_curves(STEPS, {"CLIP-I": [1] * 5}, bands={"x": ([0] * 5, [2] * 5)}),
                                "bands names"),
    "dominance_plot": (lambda: tp.dominance_plot(STEPS, [1] * 5, [1] * 4, ("a", "b")), "clip_i_b has 4 values"),
    "dominance_labels": (lambda: tp.dominance_plot(STEPS, [1] * 5, [1] * 5, "ab"), "two names"),
    "sweep_heatmap": (lambda: tp.sweep_heatmap(ROT, SCA, _sweep().T, "x"), r"\[len\(rotations\), len\(scales\)\]"),
    "sweep_lines": (lambda: tp.sweep_lines(ROT, SCA[:2], _sweep(), "x"), r"= \[4, 2\]"),
    "sweep_lines_x": (lambda: tp.sweep_lines(ROT, SCA, _sweep(), "x", x="theta"), "'rotation' or 'scale'"),
    "before_after_grid": (lambda: tp.before_after_grid(np.zeros((3, 8, 8, 3)), np.zeros((2, 8, 8, 3)), ["a"] * 3),
                          "3 before images, 2 after images and 3 prompts"),
    "norm_histogram": (lambda: tp.norm_histogram(np.ones((4, 4)), {1: 1.0}), "non-empty 1-D"),
    "norm_histogram_nan": (lambda: tp.norm_histogram(np.ones(4), {1: float("nan")}), "NaN or inf"),
    "empty_curves": (lambda: tp.shift_curves(STEPS, {}), "non-empty dict"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_plots_refuse_mismatched_inputs(name):
    fn, msg = BAD[name]
    with pytest.raises(ValueError, match=msg):
        fn()


def test_sweep_lines_draw_interval_bands_around_each_line():
    fig, ax = new_ax()
    v = _sweep()
    tp.sweep_lines(ROT, SCA, v, "CLIP-T", x="rotation", ax=ax, low=v - 1, high=v + 2)
    assert len(ax.lines) == len(SCA) and len(ax.collections) == len(SCA)
    band = ax.collections[1].get_paths()[0].vertices  # scale 0.5: its line's values -1 .. +2
    assert band[:, 1].min() == pytest.approx(v[:, 1].min() - 1) and band[:, 1].max() == pytest.approx(v[:, 1].max() + 2)
    with pytest.raises(ValueError, match="both low and high"):
        tp.sweep_lines(ROT, SCA, v, "CLIP-T", low=v)

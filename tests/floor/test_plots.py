"""persviz.plots: each figure is returned, drawn on the given axes when one is passed, with the drawn values equal to
the inputs, and matplotlib's global state (rcParams, pyplot figures) left alone."""
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from persviz.plots import difference_plot, grouped_bars, image_grid, interval_plot  # noqa: E402
from persviz.stats import Difference, Interval  # noqa: E402

from tests.helpers import new_ax  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_global_matplotlib_state")


def _images(n=4, h=2, w=3):
    return np.stack([np.full((h, w, 3), 40 * (i + 1), np.uint8) for i in range(n)])


def test_image_grid_returns_a_figure_with_the_tiled_canvas():
    fig = image_grid(_images(), 2, 2, row_labels=["r0", "r1"], col_labels=["c0", "c1"], title="grid")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    canvas = np.asarray(ax.images[0].get_array())
    # two rows of two 2x3 images with a 1-pixel white gap: 2*2+1 by 2*3+1
    expected = np.full((5, 7, 3), 255, np.uint8)
    expected[0:2, 0:3], expected[0:2, 4:7], expected[3:5, 0:3], expected[3:5, 4:7] = 40, 80, 120, 160
    np.testing.assert_array_equal(canvas, expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c0", "c1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["r0", "r1"]
    assert ax.get_title() == "grid"


def test_image_grid_draws_on_the_given_axes():
    fig, ax = new_ax()
    assert image_grid(_images(3), 1, 3, ax=ax) is fig
    assert len(fig.axes) == 1 and len(ax.images) == 1
    assert ax.get_xticks().size == 0 and ax.get_yticks().size == 0  # no labels, no ticks
    with pytest.raises(ValueError, match="3 images for a 2x2 grid"):
        image_grid(_images(3), 2, 2)


def test_grouped_bars_heights_are_the_values_and_missing_ones_are_nan():
    results = {"A": {"x": 0.2, "y": 0.5}, "B": {"x": 0.7}}
    fig, ax = new_ax()
    assert grouped_bars(results, target=0.9, ax=ax, title="t") is fig
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == pytest.approx([0.2, 0.5, 0.7]) and np.isnan(heights[3])  # groups in order, labels x, y
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"]
    assert [line.get_ydata()[0] for line in ax.lines] == [0.9]  # the target line
    assert ax.get_ylim() == pytest.approx((0, 1.08)) and ax.get_legend() is not None
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]


def test_grouped_bars_one_group_has_no_legend_and_values_above_one_rescale():
    fig = grouped_bars({"only": {"a": 2.0, "b": 3.0}}, ylabel="score")
    ax = fig.axes[0]
    assert ax.get_legend() is None and ax.get_ylabel() == "score" and ax.get_ylim()[1] > 3.0


def test_figures_render_to_png_without_pyplot():
    for fig in (image_grid(_images(), 2, 2), grouped_bars({"g": {"a": 0.5}})):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        img = Image.open(io.BytesIO(buf.getvalue()))
        assert img.format == "PNG" and img.size[0] > 10 and img.size[1] > 10


def test_interval_and_difference_plots_draw_each_row():
    rows = {"a": Interval(1.0, 0.5, 1.5, 10, 20), "b": Interval(2.0, 1.0, 3.0, 10, 20)}
    fig = interval_plot(rows, "CLIP-I")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"] and "10 prompts" in ax.get_title()
    diffs = {"x": Difference(0.5, 0.1, 0.9, 10, 20, p=0.01, p_holm=0.02),
             "y": Difference(-0.1, -0.4, 0.2, 10, 20, p=0.5, p_holm=0.5)}
    fig = difference_plot(diffs)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["p=0.02", "p=0.5"]
    with pytest.raises(ValueError, match="no rows"):
        interval_plot({}, "x")

"""persviz.finexl.plots: figures returned, given axes used, drawn values equal the inputs, no global state."""
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from persviz.finexl import plots as fp  # noqa: E402
from persviz.finexl.decompose import Decomposition, decompose, explain  # noqa: E402

from tests.helpers import new_ax  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_global_matplotlib_state")

torch.set_num_threads(1)
D = 8


def _e(i):
    v = torch.zeros(D, dtype=torch.float64)
    v[i] = 1.0
    return v


@pytest.fixture
def dec() -> Decomposition:
    concepts = {"warmer colors": _e(0), "blurry": _e(1), "thick outlines": _e(2)}
    return decompose(0.6 * _e(0) - 0.25 * _e(1) + 0.1 * _e(2) + 0.2 * _e(3), concepts)


def _images(n=3, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


PLOTS = {
    "decomposition_bars": lambda ax, dec: fp.decomposition_bars(dec, ax=ax),
    "concept_cosine_heatmap": lambda ax, dec: fp.concept_cosine_heatmap({"a": _e(0), "b": _e(0) + _e(1)}, ax=ax),
    "weight_vs_level": lambda ax, dec: fp.weight_vs_level([0.1, 0.2, 0.3], [0.0, 0.5, 0.4], ax=ax),
    "paired_strip": lambda ax, dec: fp.paired_strip(_images(), _images(seed=1), ax=ax),
}


@pytest.mark.parametrize("name", PLOTS)
def test_plot_draws_on_given_ax_and_returns_its_figure(name, dec):
    fig, ax = new_ax()
    out = PLOTS[name](ax, dec)
    assert out is fig
    assert ax.has_data() or ax.images


@pytest.mark.parametrize("name", PLOTS)
def test_plot_builds_its_own_figure_without_pyplot(name, dec):
    out = PLOTS[name](None, dec)
    assert isinstance(out, Figure) and len(out.axes) >= 1
    out.savefig(io.BytesIO(), format="png")  # lays out and renders


# ----------------------------------------------------------------------------- decomposition bars


def test_decomposition_bars_values_residual_and_known(dec):
    fig, ax = new_ax()
    fp.decomposition_bars(dec, known={"warmer colors": 0.55, "not shown": 1.0}, ax=ax)
    weights_bars, residual_bars = ax.containers
    np.testing.assert_allclose([b.get_width() for b in weights_bars], dec.weights.numpy())
    assert [b.get_width() for b in residual_bars] == pytest.approx([dec.relative_residual])
    assert [t.get_text() for t in ax.get_yticklabels()] == dec.names + ["residual e"]
    assert [b.get_facecolor() for b in weights_bars][1] != weights_bars[0].get_facecolor()  # sign colors
    (known,) = ax.collections
    np.testing.assert_allclose(known.get_offsets(), [[0.55, 0.0]])  # on the "warmer colors" row only
    assert ax.get_title() == f"lstsq: e = {dec.relative_residual:.2f} >= e_decomp 0.2"
    assert ax.yaxis_inverted()


def test_decomposition_bars_from_a_dict_and_with_sentences(dec):
    fig, ax = new_ax()
    fp.decomposition_bars({"a": 0.3, "b": -0.1}, ax=ax, title="baseline")
    (bars,) = ax.containers  # no residual given: no residual bar
    assert [b.get_width() for b in bars] == pytest.approx([0.3, -0.1])
    assert ax.get_title() == "baseline"
    fig, ax = new_ax()
    fp.decomposition_bars(dec, sentences=True, ax=ax)
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == explain(dec)
    with pytest.raises(ValueError, match="decomposition is empty"):
        fp.decomposition_bars({})
    with pytest.raises(ValueError, match="sentences=True needs a Decomposition"):
        fp.decomposition_bars({"a": 0.3}, sentences=True)
    with pytest.raises(TypeError, match="Decomposition or a dict"):
        fp.decomposition_bars([0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        fp.decomposition_bars({"a": float("nan")})


# ----------------------------------------------------------------------------- cosine heatmap


def test_cosine_heatmap_values():
    concepts = {"a": _e(0), "b": _e(0) + _e(1), "c": -_e(1)}
    names, cos = fp.cosine_matrix(concepts)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(cos, [[1, s, 0], [s, 1, -s], [0, -s, 1]], atol=1e-12)
    fig, ax = new_ax()
    fp.concept_cosine_heatmap(concepts, ax=ax)
    (im,) = ax.images
    np.testing.assert_allclose(im.get_array(), cos)
    assert im.get_clim() == (-1.0, 1.0)
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.71", "0.00", "0.71", "1.00", "-0.71",
                                                "0.00", "-0.71", "1.00"]  # no "-0.00"
    assert [t.get_text() for t in ax.get_xticklabels()] == names == ["a", "b", "c"]
    fig, ax = new_ax()
    fp.concept_cosine_heatmap(concepts, ax=ax, annotate=False)
    assert len(ax.texts) == 0
    with pytest.raises(ValueError, match="non-empty dict"):
        fp.cosine_matrix({})
    with pytest.raises(ValueError, match="differ in dimension"):
        fp.cosine_matrix({"a": _e(0), "b": torch.ones(3)})
    with pytest.raises(ValueError, match="zero-norm concept vectors.*'z'"):
        fp.cosine_matrix({"a": _e(0), "z": torch.zeros(D)})


# ----------------------------------------------------------------------------- weight vs level


def test_weight_vs_level_scatter_and_spearman_title():
    levels, weights = [0.2, 0.4, 0.6, 0.8, 1.0], [0.05, 0.2, 0.11, 0.3, 0.31]
    fig, ax = new_ax()
    fp.weight_vs_level(levels, weights, labels=list("abcde"), ax=ax, title="warmth")
    (pts,) = ax.collections
    np.testing.assert_allclose(pts.get_offsets(), np.c_[levels, weights])
    rho = spearmanr(levels, weights).statistic
    assert fp.spearman(levels, weights) == pytest.approx(rho)
    assert ax.get_title() == f"warmth\nSpearman ρ = {rho:.2f} (n = 5)"
    assert [t.get_text() for t in ax.texts] == list("abcde")


def test_weight_vs_level_per_aspect_and_constant_input():
    fig, ax = new_ax()
    fp.weight_vs_level({"warm": [1, 2, 3], "blur": [1, 2, 3]}, {"warm": [0.1, 0.2, 0.3], "blur": [0.3, 0.2, 0.1]},
                       ax=ax)
    assert len(ax.collections) == 2
    assert ax.get_title() == "mean Spearman ρ = 0.00 over 2 aspects"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["warm (ρ = 1.00)", "blur (ρ = -1.00)"]
    fig, ax = new_ax()
    fp.weight_vs_level([1, 2, 3], [0.5, 0.5, 0.5], ax=ax)
    assert "undefined (constant input)" in ax.get_title()
    with pytest.raises(ValueError, match="3 values but 2 were expected"):
        fp.weight_vs_level([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 points"):
        fp.weight_vs_level([1], [1])
    with pytest.raises(ValueError, match="same aspects"):
        fp.weight_vs_level({"a": [1, 2]}, [1, 2])
    with pytest.raises(ValueError, match="labels has 1 entries for 2 points"):
        fp.weight_vs_level([1, 2], [1, 2], labels=["x"])


# ----------------------------------------------------------------------------- paired strip


def test_paired_strip_layout_and_pixels():
    b, p = _images(5, 6), _images(5, 6, seed=1)
    fig, ax = new_ax()
    fp.paired_strip(b, p, labels=[f"prompt {i} with a rather long text" for i in range(5)], max_pairs=3, ax=ax)
    (im,) = ax.images
    canvas = np.asarray(im.get_array())
    assert canvas.shape == (2 * 6 + 1, 3 * 6 + 2, 3)
    np.testing.assert_array_equal(canvas[:6, 7:13], b[1])  # top row base, 1-pixel gaps
    np.testing.assert_array_equal(canvas[7:13, 14:20], p[2])  # bottom row personalized
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "personalized"]
    assert all(len(line) <= 17 for t in ax.get_xticklabels() for line in t.get_text().split("\n"))
    assert ax.get_xticklabels()[0].get_text() == "prompt 0 with a\nrather long text"
    with pytest.raises(ValueError, match="differ in shape.*resize="):
        fp.paired_strip(_images(2, 6), _images(2, 8))
    with pytest.raises(ValueError, match="labels has 1 entries for 2 pairs"):
        fp.paired_strip(_images(2), _images(2), labels=["x"])


# ----------------------------------------------------------------------------- intervals


def _bar_spans(container, axis=1):
    eb = getattr(container, "errorbar", container)  # a bar's container holds its ErrorbarContainer
    (segments,) = [lc.get_segments() for lc in eb.lines[2]]
    return [(s[0][axis], s[1][axis]) for s in segments if len(s) and np.all(np.isfinite(s))]  # none: no interval


def test_weight_vs_level_draws_intervals_as_error_bars():
    fig, ax = new_ax()
    fp.weight_vs_level([0.2, 0.5, 1.0], [0.1, 0.3, 0.5], intervals=[(0.05, 0.2), None, (0.4, 0.55)], ax=ax)
    (bars,) = ax.containers
    np.testing.assert_allclose(_bar_spans(bars), [(0.05, 0.2), (0.4, 0.55)])  # the point without one gets none
    fig, ax = new_ax()
    fp.weight_vs_level({"red": [0.5, 1.0], "large": [0.5, 1.0]}, {"red": [0.2, 0.4], "large": [0.1, 0.3]},
                       intervals={"red": [(0.1, 0.3), (0.35, 0.5)]}, ax=ax)
    assert len(ax.containers) == 1 and len(ax.collections) >= 2
    with pytest.raises(ValueError, match="one \\(low, high\\) per value"):
        fp.weight_vs_level([1, 2], [1, 2], intervals=[(0, 1)])
    with pytest.raises(ValueError, match="low must not exceed high"):
        fp.weight_vs_level([1, 2], [1, 2], intervals=[(0, 1), (3, 2)])


def test_decomposition_bars_and_top1_bars_draw_intervals(dec):
    fig, ax = new_ax()
    fp.decomposition_bars(dec, ax=ax, intervals={"warmer colors": (0.5, 0.7), "blurry": (-0.3, -0.2)})
    np.testing.assert_allclose(_bar_spans(ax.containers[0], axis=0), [(0.5, 0.7), (-0.3, -0.2)])
    result = {"summary": {"naive": {"render_single/top1": 0.5, "lora_single/top1": 1.0},
                          "persviz": {"render_single/top1": 1.0, "lora_single/top1": 0.5}},
              "intervals": {"summary": {"naive": {"render_single/top1": [0.25, 0.75], "lora_single/top1": [1, 1]},
                                        "persviz": {"render_single/top1": [0.75, 1.0],
                                                    "lora_single/top1": [0.0, 1.0]}}},
              "variants": {"a": {"group": "render_single", "truth": {"red": 1}},
                           "b": {"group": "render_single", "truth": {"red": 0.5}},
                           "c": {"group": "lora_single", "truth": {"red": 1}},
                           "d": {"group": "lora_single", "truth": {"red": 1}}}}
    fig, ax = new_ax()
    assert fp.top1_bars(result, ax=ax) is fig
    spans = [_bar_spans(c) for c in ax.containers if getattr(c, "errorbar", None) is not None]
    np.testing.assert_allclose(spans, [[(0.25, 0.75), (1, 1)], [(0.75, 1.0), (0.0, 1.0)]])
    assert "1/2" in [t.get_text() for t in ax.texts] and "interval" in ax.get_title()
    fig = fp.top1_bars({k: v for k, v in result.items() if k != "intervals"})  # no intervals: plain bars
    assert isinstance(fig, Figure) and "interval" not in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="summary"):
        fp.top1_bars({})

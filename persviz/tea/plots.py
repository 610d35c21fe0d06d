"""Plots of the TEA semantic-collapse study (docs/tea.md §3-§6; paper Figs. 2-6, Table 1).

Same convention as persviz.plots: every function returns a matplotlib Figure built without pyplot,
draws on `ax` (or `axes`) when one is given, and never touches rcParams.

    fig = shift_grid(steps, {"L2": {"inter d(P_V*, P_c)": [...], "intra d(P_V*)": [...]}, "KL": {...}})
    fig = norm_histogram(vocab_norms(pipe), {100: 0.41, 3000: 1.8}, class_norm=0.39)
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from persviz.images import as_uint8
from persviz.plots import figure_and_ax, image_grid

_STEP = "training step"
_LEGEND_MAX = 8  # more step marks than this get a colorbar instead of a legend


# ----------------------------------------------------------------------------- input checks


def _array(x: Any, name: str) -> np.ndarray:
    """x (list, numpy array or torch tensor) as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers; got {type(x).__name__} ({e})") from None


def _vector(x: Any, name: str, n: Optional[int] = None, finite: bool = False) -> np.ndarray:
    """A 1-D float array of length n (when given); NaN allowed (a gap) unless finite."""
    a = _array(x, name)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers; got shape {a.shape}")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} values but there are {n} steps; pass one value per step")
    if finite and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _steps(steps: Any, name: str = "steps") -> np.ndarray:
    return _vector(steps, name, finite=True)


def _series(steps: np.ndarray, curves: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    """{label: 1-D array of len(steps)}, refusing an empty mapping or a length mismatch."""
    if not isinstance(curves, Mapping) or len(curves) == 0:
        raise ValueError(f"{name} must be a non-empty dict {{label: values per step}}; got {curves!r}")
    return {str(k): _vector(v, f"{name}[{k!r}]", len(steps)) for k, v in curves.items()}


def _finish(ax: Axes, title: Optional[str], xlabel: str, ylabel: Optional[str], legend: bool) -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _draw_lines(ax: Axes, x: np.ndarray, series: Mapping[str, np.ndarray]) -> dict[str, str]:
    """One line with markers per series; returns {label: color}."""
    colors = {}
    for label, y in series.items():
        (line,) = ax.plot(x, y, marker="o", markersize=3, lw=1.2, label=label)
        colors[label] = line.get_color()
    return colors


# ----------------------------------------------------------------------------- Fig. 4: norms


def norm_histogram(
    vocab_norms: ArrayLike,
    marks: Mapping[str | int, float],
    class_norm: Optional[float] = None,
    ax: Optional[Axes] = None,
    bins: int = 100,
    log: bool = True,
    cmap: str = "viridis",
    title: Optional[str] = None,
) -> Figure:
    """Histogram of the norms [V] of all input-embedding rows, with |V*| per saved step and |c| marked (Fig. 4).

    Args:
        vocab_norms: persviz.embeddings.vocab_norms(pipe), shape [V].
        marks: {step (or label): |V*| at that step}; int steps are sorted and coloured by value, other
            keys in the given order. Up to 8 marks get a legend (with the percentile of each norm in
            the vocabulary, or in the far tail the number of rows with a larger norm), more get a
            colorbar over steps.
        class_norm: |c|, the class word's norm, drawn dashed black.
        log: log-scaled counts, so the tail where |V*| drifts (near the special tokens) stays visible.
    """
    norms = _vector(vocab_norms, "vocab_norms", finite=True)
    if not isinstance(marks, Mapping):
        raise ValueError(f"marks must be a dict {{step: |V*|}}; got {type(marks).__name__}")
    items = [(k, float(_vector([v], f"marks[{k!r}]", finite=True)[0])) for k, v in marks.items()]
    numeric = len(items) > 0 and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k, _ in items)
    if numeric:
        items.sort(key=lambda kv: kv[0])
    if class_norm is not None:
        class_norm = float(_vector([class_norm], "class_norm", finite=True)[0])
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive int; got {bins!r}")

    fig, ax = figure_and_ax(ax, (6.0, 3.2))
    ax.hist(norms, bins=int(bins), color="0.65", log=log, label=f"{norms.size} vocabulary rows")
    cm = matplotlib.colormaps[cmap]
    keys = [k for k, _ in items]
    values = [float(k) for k in keys] if numeric else list(range(len(items)))
    norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1) if items else None
    use_colorbar = numeric and len(items) > _LEGEND_MAX
    for (k, v), t in zip(items, values):
        above = int(np.sum(norms > v))
        if above >= 0.001 * norms.size:
            where = f"p{100.0 * (1 - above / norms.size):.1f}"
        else:  # the far tail: a percentile would read p100.0
            where = f"{above} row{'s' * (above != 1)} larger"
        label = None if use_colorbar else f"{'step ' if numeric else ''}{k}: |V*|={v:.3g} ({where})"
        ax.axvline(v, color=cm(norm(t)), lw=1.4, label=label)
    if class_norm is not None:
        ax.axvline(class_norm, color="k", ls="--", lw=1.2, label=f"|c|={class_norm:.3g}")
    if use_colorbar:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cm), ax=ax)
        cb.set_label(f"{_STEP} of |V*|", fontsize=8)
    ax.set_xlabel("L2 norm of the input-embedding row")
    ax.set_ylabel("rows" + (" (log)" if log else ""))
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def norm_ratio_curve(
    steps: ArrayLike,
    ratio: ArrayLike,
    cosine: ArrayLike,
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
) -> Figure:
    """|V*|/|c| (left axis, with the line ratio = 1) and cos(V*, c) (right, twin axis) over training steps."""
    x = _steps(steps)
    r = _vector(ratio, "ratio", len(x))
    c = _vector(cosine, "cosine", len(x))
    fig, ax = figure_and_ax(ax, (5.0, 3.0))
    (l1,) = ax.plot(x, r, marker="o", markersize=3, color="C0", label="|V*| / |c|")
    ax.axhline(1.0, color="C0", ls=":", lw=0.8)
    ax.set_ylabel("|V*| / |c|", color="C0")
    ax.tick_params(axis="y", colors="C0")
    ax2 = ax.twinx()
    (l2,) = ax2.plot(x, c, marker="s", markersize=3, color="C1", label="cos(V*, c)")
    ax2.set_ylabel("cos(V*, c)", color="C1")
    ax2.tick_params(axis="y", colors="C1")
    ax.legend(handles=[l1, l2], fontsize=8)
    _finish(ax, title, _STEP, None, legend=False)
    return fig


# ----------------------------------------------------------------------------- Fig. 2: semantic shift


def shift_curves(
    steps: ArrayLike,
    curves: Mapping[str, ArrayLike],
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    ylabel: str = "distance",
) -> Figure:
    """Semantic-shift metric vs training step, one line per curve, e.g. {"inter d(P_V*, P_c)": [...], ...} (Fig. 2)."""
    x = _steps(steps)
    series = _series(x, curves, "curves")
    fig, ax = figure_and_ax(ax, (5.0, 3.0))
    _draw_lines(ax, x, series)
    _finish(ax, title, _STEP, ylabel, legend=True)
    return fig


def shift_grid(
    steps: ArrayLike,
    results: Mapping[str, Mapping[str, ArrayLike]],
    axes: Optional[Sequence[Axes]] = None,
    ncols: int = 2,
    title: Optional[str] = None,
) -> Figure:
    """One shift_curves panel per metric ({metric: {curve: values per step}}, e.g. L2, Hausdorff, Mahalanobis, KL).

    `axes`, when given, holds one Axes per metric (all on one Figure); the legend is drawn once when
    every panel has the same curves, else in each panel.
    """
    x = _steps(steps)
    if not isinstance(results, Mapping) or len(results) == 0:
        raise ValueError("results must be a non-empty dict {metric: {curve: values per step}}")
    panels = {str(m): _series(x, c, f"results[{m!r}]") for m, c in results.items()}
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a positive int; got {ncols!r}")
    if axes is not None:
        axes = list(axes)
        if len(axes) != len(panels):
            raise ValueError(f"got {len(axes)} axes for {len(panels)} metrics; pass one Axes per metric")
        fig = axes[0].figure
        if any(a.figure is not fig for a in axes):
            raise ValueError("all axes must belong to the same Figure")
    else:
        ncols = min(int(ncols), len(panels))
        nrows = -(-len(panels) // ncols)
        fig = Figure(figsize=(4.0 * ncols, 2.8 * nrows), layout="constrained")
        axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(panels))]
    same = len({tuple(s) for s in panels.values()}) == 1
    for i, (ax, (metric, series)) in enumerate(zip(axes, panels.items())):
        _draw_lines(ax, x, series)
        _finish(ax, metric, _STEP, None, legend=(i == 0 or not same))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ----------------------------------------------------------------------------- Figs. 3, 5: impacts


def impact_curves(
    steps: ArrayLike,
    series: Mapping[str, ArrayLike],
    ax: Optional[Axes] = None,
    reference: Optional[Mapping[str, float]] = None,
    title: Optional[str] = None,
    ylabel: str = "score (100 x cosine)",
    bands: Optional[Mapping[str, tuple[ArrayLike, ArrayLike]]] = None,
    reference_bands: Optional[Mapping[str, tuple[float, float]]] = None,
) -> Figure:
    """Two-way impact of training on generation: e.g. CLIP-T context, CLIP-T concept, CLIP-I vs step (Fig. 3).

    `reference` ({series label: value}, e.g. the base model's score) is drawn as a dotted line in that series' colour;
    `bands` ({series label: (low, high)}, one value per step) and `reference_bands` ({series label: (low, high)})
    shade intervals (e.g. the evaluation protocol's 95 %) around a series and its reference.
    """
    x = _steps(steps)
    data = _series(x, series, "series")
    ref = {}
    if reference is not None:
        if not isinstance(reference, Mapping):
            raise ValueError("reference must be a dict {series label: value}")
        unknown = [k for k in reference if str(k) not in data]
        if unknown:
            raise ValueError(f"reference names {unknown}, which are not series; series are {list(data)}")
        ref = {str(k): float(_vector([v], f"reference[{k!r}]", finite=True)[0]) for k, v in reference.items()}
    for name, given in (("bands", bands), ("reference_bands", reference_bands)):
        unknown = [k for k in (given or {}) if str(k) not in data]
        if unknown:
            raise ValueError(f"{name} names {unknown}, which are not series; series are {list(data)}")
    fig, ax = figure_and_ax(ax, (5.0, 3.0))
    colors = _draw_lines(ax, x, data)
    for k, (lo, hi) in (bands or {}).items():
        lo, hi = _vector(lo, f"bands[{k!r}] low", len(x)), _vector(hi, f"bands[{k!r}] high", len(x))
        ax.fill_between(x, lo, hi, color=colors[str(k)], alpha=0.18, linewidth=0)
    for k, v in ref.items():
        ax.axhline(v, color=colors[k], ls=":", lw=1.0)
    for k, (lo, hi) in (reference_bands or {}).items():
        ax.axhspan(float(lo), float(hi), color=colors[str(k)], alpha=0.08, linewidth=0)
    _finish(ax, title, _STEP, ylabel, legend=True)
    return fig


def dominance_plot(
    steps: ArrayLike,
    clip_i_a: ArrayLike,
    clip_i_b: ArrayLike,
    labels: Sequence[str],
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    xlabel: str = "training step of the varied concept",
) -> Figure:
    """Multi-concept dominance (Fig. 5): CLIP-I to concept A's and B's anchor images as one concept's step varies.

    Steps where B's score exceeds A's are shaded.
    """
    x = _steps(steps)
    a = _vector(clip_i_a, "clip_i_a", len(x))
    b = _vector(clip_i_b, "clip_i_b", len(x))
    if isinstance(labels, str) or len(labels) != 2:
        raise ValueError(f"labels must be two names (concept A, concept B); got {labels!r}")
    fig, ax = figure_and_ax(ax, (5.0, 3.0))
    ax.plot(x, a, marker="o", markersize=3, color="C0", label=f"CLIP-I to {labels[0]}")
    ax.plot(x, b, marker="s", markersize=3, color="C3", label=f"CLIP-I to {labels[1]}")
    ax.fill_between(x, a, b, where=b > a, color="C3", alpha=0.12, interpolate=True, lw=0)
    _finish(ax, title, xlabel, "CLIP-I (100 x cosine)", legend=True)
    return fig


# ----------------------------------------------------------------------------- Table 1, Fig. 6: sweeps


def _sweep(rotations: ArrayLike, scales: ArrayLike, values: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = _vector(rotations, "rotations", finite=True)
    s = _vector(scales, "scales", finite=True)
    v = _array(values, "values")
    if v.shape != (r.size, s.size):
        raise ValueError(
            f"values must be shaped [len(rotations), len(scales)] = [{r.size}, {s.size}]; got {v.shape}"
        )
    return r, s, v


def sweep_heatmap(
    rotations: ArrayLike,
    scales: ArrayLike,
    values: ArrayLike,
    label: str,
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    cmap: str = "viridis",
    annotate: bool = True,
    fmt: str = "{:.1f}",
) -> Figure:
    """values [R, S] of one score over a rotation x scale sweep as a heatmap (rows: rotation, columns: scale).

    NaN cells (runs not made) stay blank; `fmt` formats the cell annotations.
    """
    r, s, v = _sweep(rotations, scales, values)
    fig, ax = figure_and_ax(ax, (1.0 + 0.6 * s.size, 0.8 + 0.45 * r.size))
    im = ax.imshow(np.ma.masked_invalid(v), origin="lower", aspect="auto", cmap=cmap)
    ax.set_xticks(range(s.size), [f"{t:g}" for t in s])
    ax.set_yticks(range(r.size), [f"{t:g}" for t in r])
    ax.set_xlabel("scale")
    ax.set_ylabel("rotation")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(label, fontsize=8)
    if annotate:
        lo, hi = im.norm.vmin, im.norm.vmax
        for i in range(r.size):
            for j in range(s.size):
                if np.isfinite(v[i, j]):
                    frac = 0.5 if hi == lo else (v[i, j] - lo) / (hi - lo)
                    ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=7,
                            color="k" if frac > 0.5 else "w")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def sweep_lines(
    rotations: ArrayLike,
    scales: ArrayLike,
    values: ArrayLike,
    label: str,
    x: str = "rotation",
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    cmap: str = "viridis",
    low: Optional[ArrayLike] = None,
    high: Optional[ArrayLike] = None,
) -> Figure:
    """values [R, S] against one knob (`x`: "rotation" or "scale"), one line per value of the other (Fig. 6);
    `low`/`high` [R, S] (e.g. the evaluation protocol's 95 % interval) draw a band around each line."""
    r, s, v = _sweep(rotations, scales, values)
    if x not in ("rotation", "scale"):
        raise ValueError(f"x must be 'rotation' or 'scale'; got {x!r}")
    if (low is None) != (high is None):
        raise ValueError("pass both low and high (the interval's ends) or neither")
    bands = None if low is None else (_sweep(r, s, low)[2], _sweep(r, s, high)[2])
    xs, others, other_name, rows = (r, s, "scale", v.T) if x == "rotation" else (s, r, "rotation", v)
    if bands is not None:
        bands = tuple(b.T if x == "rotation" else b for b in bands)
    fig, ax = figure_and_ax(ax, (5.0, 3.0))
    cm = matplotlib.colormaps[cmap]
    for k, (o, y) in enumerate(zip(others, rows)):
        color = cm(k / max(1, len(others) - 1))
        ax.plot(xs, y, marker="o", markersize=3, color=color, label=f"{other_name}={o:g}")
        if bands is not None:
            ax.fill_between(xs, bands[0][k], bands[1][k], color=color, alpha=0.18, linewidth=0)
    _finish(ax, title, x, label, legend=True)
    return fig


# ----------------------------------------------------------------------------- before / after images


def before_after_grid(
    before: Any,
    after: Any,
    prompts: Sequence[str],
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    labels: Sequence[str] = ("before TEA", "after TEA"),
    wrap: int = 36,
) -> Figure:
    """Images [N, H, W, 3] before and after TEA side by side, one row per prompt (same seed per row)."""
    b, a = as_uint8(before), as_uint8(after)
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image pair")
    if not (len(b) == len(a) == len(prompts)):
        raise ValueError(
            f"got {len(b)} before images, {len(a)} after images and {len(prompts)} prompts; pass one of each per row"
        )
    if b.shape != a.shape:
        raise ValueError(f"before and after images must have the same shape; got {b.shape} and {a.shape}")
    if isinstance(labels, str) or len(labels) != 2:
        raise ValueError(f"labels must be two column titles; got {labels!r}")
    images = np.stack([a_ for pair in zip(b, a) for a_ in pair])
    rows = ["\n".join(textwrap.wrap(str(p), wrap)) or " " for p in prompts]
    if ax is None:  # image_grid's own size, anchored right so constrained layout keeps long row labels in the figure
        fig = Figure(figsize=(2 * 1.4 + 2.5, 1.4 * len(b) + 0.6), layout="constrained")
        ax = fig.add_subplot()
        ax.set_anchor("E")
    return image_grid(images, nrows=len(b), ncols=2, row_labels=rows, col_labels=list(labels), title=title, ax=ax,
                      cell_inches=1.4)

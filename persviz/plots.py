"""Plots: each returns the matplotlib Figure and draws on `ax` when one is given (no global rcParams)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from persviz.images import as_uint8


def figure_and_ax(ax: Optional[Axes], figsize) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def image_grid(images, nrows: int, ncols: int, row_labels: Optional[Sequence[str]] = None,
               col_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
               ax: Optional[Axes] = None, pad: int = 1, cell_inches: float = 1.0) -> Figure:
    """Images [nrows*ncols, H, W, 3] (row-major) tiled into one picture with optional row and column labels."""
    imgs = as_uint8(images)
    if len(imgs) != nrows * ncols:
        raise ValueError(f"got {len(imgs)} images for a {nrows}x{ncols} grid")
    h, w = imgs.shape[1:3]
    canvas = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncols)
        canvas[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = im
    fig, ax = figure_and_ax(ax, (cell_inches * ncols + (2.5 if row_labels else 0), cell_inches * nrows + 0.6))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([c * (w + pad) + w / 2 for c in range(ncols)] if col_labels else [])
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(nrows)] if row_labels else [])
    if col_labels:
        ax.set_xticklabels(col_labels, fontsize=8)
        ax.xaxis.tick_top()
    if row_labels:
        ax.set_yticklabels(row_labels, fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def grouped_bars(results: Mapping[str, Mapping[str, float]], ylabel: str = "accuracy",
                 target: Optional[float] = None, ax: Optional[Axes] = None, title: Optional[str] = None) -> Figure:
    """Bars of {group: {label: value}}, labels on the x axis, one color per group; optional target line."""
    groups = list(results)
    labels = list(dict.fromkeys(k for g in groups for k in results[g]))
    fig, ax = figure_and_ax(ax, (max(4.0, 0.7 * len(labels) * len(groups) + 1), 3.0))
    width = 0.8 / len(groups)
    x = np.arange(len(labels))
    for i, g in enumerate(groups):
        vals = [results[g].get(k, np.nan) for k in labels]
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, vals, width, label=g)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.08 if all(v <= 1 for g in groups for v in results[g].values()) else None)
    if len(groups) > 1:
        ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def interval_plot(rows: Mapping[str, object], label: str, ax: Optional[Axes] = None,
                  title: Optional[str] = None, reference: Optional[float] = None) -> Figure:
    """Means with their intervals, one row each: {row label: Interval (mean, low, high)}, horizontal error bars;
    `reference` draws a vertical line (0 for differences)."""
    names = list(rows)
    if not names:
        raise ValueError("no rows to plot")
    means = np.array([getattr(rows[n], "mean") for n in names], dtype=float)
    lows = np.array([getattr(rows[n], "low") for n in names], dtype=float)
    highs = np.array([getattr(rows[n], "high") for n in names], dtype=float)
    fig, ax = figure_and_ax(ax, (4.8, 0.35 * len(names) + 1.0))
    y = np.arange(len(names))[::-1]
    ax.errorbar(means, y, xerr=[means - lows, highs - means], fmt="o", ms=4, capsize=3, color="C0")
    if reference is not None:
        ax.axvline(reference, color="k", lw=0.8, ls="--")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel(label)
    n = getattr(rows[names[0]], "n_prompts", None)
    level = getattr(rows[names[0]], "level", 0.95)
    ax.set_title(title or f"mean and {level:.0%} interval" + (f" ({n} prompts)" if n else ""), fontsize=10)
    return fig


def difference_plot(differences: Mapping[str, object], ax: Optional[Axes] = None, title: Optional[str] = None,
                    alpha: float = 0.05) -> Figure:
    """Paired differences with their intervals, one row per metric (persviz.stats.Difference), a line at 0; a row
    whose Holm p is below `alpha` is drawn filled, the others open, with its Holm p written beside it."""
    names = list(differences)
    if not names:
        raise ValueError("no differences to plot")
    fig, ax = figure_and_ax(ax, (5.2, 0.35 * len(names) + 1.0))
    y = np.arange(len(names))[::-1]
    for yi, n in zip(y, names):
        d = differences[n]
        p = float(getattr(d, "p_holm", np.nan))
        holds = p < alpha
        ax.errorbar([d.mean], [yi], xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", ms=5, capsize=3,
                    color="C3", markerfacecolor="C3" if holds else "white")
        ax.annotate(f"p={p:.2g}", (d.high, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("difference (b - a)")
    ax.set_title(title or f"paired differences; filled: Holm p < {alpha:g}", fontsize=10)
    return fig

"""Plots of FineXL (docs/finexl.md): the decomposition, the concept directions, accuracy, samples.

Same convention as persviz.plots: every function returns a matplotlib Figure built without
pyplot, draws on ``ax`` when one is given, and never touches rcParams.

    fig = decomposition_bars(dec, known={"warm colors": 0.6})
    fig = concept_cosine_heatmap({c: f[c] for c in dec.names})
    fig = weight_vs_level([0.2, 0.4, 0.6, 0.8], [0.05, 0.11, 0.2, 0.24], intervals=[(0.03, 0.07), ...])
    fig = top1_bars(json.loads(BENCHMARK_JSON.read_text()))       # the benchmark's top-1 rates with intervals
    fig = paired_strip(imgs_base, imgs_personal, labels=prompts)
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from persviz.finexl.decompose import Decomposition, explain
from persviz.finexl.generators import check_pairs
from persviz.metrics import spearman
from persviz.plots import figure_and_ax, image_grid

POSITIVE, NEGATIVE, RESIDUAL, KNOWN = "C0", "C3", "0.6", "k"


def _vector(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    """A finite, non-empty 1-D float64 array (of length n when given)."""
    if hasattr(x, "detach"):
        x = x.detach().double().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers; got {type(x).__name__} ({e})") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers; got shape {a.shape}")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} values but {n} were expected (one per point)")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _errors(values: np.ndarray, intervals: Any, name: str) -> Optional[np.ndarray]:
    """The [2, N] distances from each value down to its interval's low end and up to its high end (matplotlib's
    asymmetric error bars); None when no interval is given; a missing interval (None) draws no bar (NaN)."""
    if intervals is None:
        return None
    ivs = list(intervals)
    if len(ivs) != values.size:
        raise ValueError(f"{name} has {len(ivs)} intervals for {values.size} values; pass one (low, high) per value")
    err = np.full((2, values.size), np.nan)
    for i, iv in enumerate(ivs):
        if iv is None or any(b is None for b in iv):
            continue
        lo, hi = (float(b) for b in iv)
        if not lo <= hi:
            raise ValueError(f"{name}[{i}] = ({lo}, {hi}): low must not exceed high")
        err[:, i] = [max(0.0, values[i] - lo), max(0.0, hi - values[i])]
    return err


# ----------------------------------------------------------------------------- decomposition


def decomposition_bars(decomposition: Union[Decomposition, Mapping[str, float]],
                       relative_residual: Optional[float] = None, known: Optional[Mapping[str, float]] = None,
                       sentences: bool = False, ax: Optional[Axes] = None, title: Optional[str] = None,
                       intervals: Optional[Mapping[str, Any]] = None) -> Figure:
    """Horizontal bars of the concept weights, with the unexplained part as a last gray bar.

    Args:
        decomposition: a `persviz.finexl.decompose.Decomposition`, or ``{concept: weight}`` (e.g. a baseline).
        relative_residual: the residual bar's value for a plain dict (a Decomposition brings
            its own ``relative_residual`` and ``e_decomp``); None draws no residual bar.
        known: optional ``{concept: known level}`` drawn as black markers on the concepts' rows
            (e.g. `persviz.finexl.concepts.known_levels`); names not among the bars are ignored.
        sentences: label the rows with `persviz.finexl.decompose.explain`'s sentences instead of the names.
        title: default: the method and ``e`` against ``e_decomp``.
        intervals: optional ``{concept: (low, high)}`` drawn as error bars on the weights (e.g. a benchmark row's
            "weight_intervals", the bootstrap over probe prompts); concepts without one get no bar.

    The residual bar is ``e = |V_div - sum_i w_i f(C_i)| / |V_div|`` (a fraction of |V_div|,
    0 = fully explained), not a weight; it is hatched and drawn in gray to keep it apart.
    """
    e_decomp = None
    if isinstance(decomposition, Decomposition):
        names = list(decomposition.names)
        weights = _vector(decomposition.weights, "weights", len(names))
        relative_residual, e_decomp = decomposition.relative_residual, decomposition.e_decomp
        method = decomposition.method
        labels = explain(decomposition) if sentences else names
    elif isinstance(decomposition, Mapping):
        if len(decomposition) == 0:
            raise ValueError("decomposition is empty: pass a Decomposition or a non-empty {concept: weight}.")
        names = [str(k) for k in decomposition]
        weights = _vector(list(decomposition.values()), "weights", len(names))
        method, labels = None, names
        if sentences:
            raise ValueError("sentences=True needs a Decomposition (explain() reads its weights).")
    else:
        raise TypeError(f"decomposition must be a Decomposition or a dict {{concept: weight}}, "
                        f"got {type(decomposition).__name__}.")
    if relative_residual is not None:
        relative_residual = float(_vector([relative_residual], "relative_residual")[0])
    known = dict(known or {})
    for k, v in known.items():
        _vector([v], f"known[{k!r}]")

    rows = len(names) + (relative_residual is not None)
    fig, ax = figure_and_ax(ax, (6.0, 0.45 * rows + 1.2))
    y = np.arange(len(names))
    xerr = None if intervals is None else _errors(weights, [intervals.get(n) for n in names], "intervals")
    bars = ax.barh(y, weights, color=[POSITIVE if w >= 0 else NEGATIVE for w in weights], label="weight w",
                   xerr=xerr, capsize=2, error_kw={"lw": 0.8, "ecolor": "k"})
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ticks, ticklabels = list(y), [textwrap.shorten(s, 48, placeholder="...") for s in labels]
    if relative_residual is not None:
        r = ax.barh([len(names)], [relative_residual], color=RESIDUAL, hatch="//", edgecolor="0.3",
                    label="relative residual e")
        ax.bar_label(r, fmt="%.2f", fontsize=7, padding=2)
        ticks.append(len(names))
        ticklabels.append("residual e")
        if e_decomp is not None:
            ax.plot([e_decomp, e_decomp], [len(names) - 0.45, len(names) + 0.45], color="k", ls=":", lw=1.2,
                    label=f"e_decomp = {e_decomp:g}")
    shown = [(i, float(known[n])) for i, n in enumerate(names) if n in known]
    if shown:
        ax.scatter([v for _, v in shown], [i for i, _ in shown], marker="D", color=KNOWN, s=22, zorder=3,
                   label="known level")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.margins(x=0.15)  # room for the value labels at both ends
    ax.set_yticks(ticks)
    ax.set_yticklabels(ticklabels, fontsize=8)
    ax.invert_yaxis()  # first concept (most relevant) on top
    ax.set_xlabel("weight (residual: fraction of |V_div|)")
    if title is None and relative_residual is not None:
        bound = "" if e_decomp is None else f" {'<' if relative_residual < e_decomp else '>='} e_decomp {e_decomp:g}"
        title = f"{method + ': ' if method else ''}e = {relative_residual:.2f}{bound}"
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- concept directions


def cosine_matrix(concepts: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """``(names, C)`` with ``C[i, j] = cos(f(C_i), f(C_j))`` over ``{name: vector [D]}``."""
    if not isinstance(concepts, Mapping) or len(concepts) == 0:
        raise ValueError("concepts must be a non-empty dict {name: f(C) [D]} (e.g. from concept_directions).")
    names = [str(k) for k in concepts]
    vecs = [_vector(v, f"concepts[{k!r}]") for k, v in concepts.items()]
    if len({v.size for v in vecs}) > 1:
        raise ValueError(f"concept vectors differ in dimension ({sorted({v.size for v in vecs})}): "
                         f"embed every concept with the same encoder.")
    mat = np.stack(vecs)
    norms = np.linalg.norm(mat, axis=1)
    if np.any(norms < 1e-12):
        zero = [n for n, x in zip(names, norms) if x < 1e-12]
        raise ValueError(f"zero-norm concept vectors have no direction: {zero}")
    unit = mat / norms[:, None]
    return names, np.clip(unit @ unit.T, -1.0, 1.0)


def concept_cosine_heatmap(concepts: Mapping[str, Any], ax: Optional[Axes] = None, annotate: Optional[bool] = None,
                           title: Optional[str] = "cos(f(C_i), f(C_j))", cmap: str = "RdBu_r") -> Figure:
    """Heatmap of the pairwise cosines of concept directions (how far from orthogonal they are).

    Args:
        concepts: ``{name: f(C) [D]}``.
        annotate: write each cosine in its cell (default: when there are at most 15 concepts).
        cmap: a diverging colormap; the color scale is fixed to [-1, 1].
    """
    names, cos = cosine_matrix(concepts)
    k = len(names)
    fig, ax = figure_and_ax(ax, (0.45 * k + 2.6, 0.45 * k + 1.6))
    im = ax.imshow(cos, vmin=-1.0, vmax=1.0, cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
    short = [textwrap.shorten(n, 28, placeholder="...") for n in names]
    ax.set_xticks(range(k))
    ax.set_xticklabels(short, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k))
    ax.set_yticklabels(short, fontsize=7)
    if annotate if annotate is not None else k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{round(float(cos[i, j]), 2) + 0.0:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if abs(cos[i, j]) > 0.6 else "k")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------- accuracy


def _rho_text(rho: float) -> str:
    return "undefined (constant input)" if np.isnan(rho) else f"{rho:.2f}"


def weight_vs_level(levels: Union[Sequence[float], Mapping[str, Sequence[float]]],
                    weights: Union[Sequence[float], Mapping[str, Sequence[float]]],
                    labels: Optional[Sequence[str]] = None, ax: Optional[Axes] = None, title: Optional[str] = None,
                    xlabel: str = "known level of personalization", ylabel: str = "FineXL weight w",
                    intervals: Optional[Union[Sequence[Any], Mapping[str, Sequence[Any]]]] = None) -> Figure:
    """Scatter of FineXL's weight against the known level, Spearman's rho in the title.

    The paper's single-aspect accuracy: does w rank models as their known level does?

    Args:
        levels, weights: one value per model (>= 2); or ``{aspect: values}`` dicts with the same
            keys, one series per aspect (rho of each in the legend, their mean in the title).
        labels: optional text next to each point (single series only).
        intervals: optional ``(low, high)`` per point (a dict by aspect for dict inputs; None for a point without
            one), drawn as vertical error bars: e.g. the third value of
            ``persviz.finexl.benchmark.level_weight_series(..., intervals=True)``, the bootstrap over probes.
    """
    if isinstance(levels, Mapping) or isinstance(weights, Mapping):
        if not (isinstance(levels, Mapping) and isinstance(weights, Mapping)) or set(levels) != set(weights):
            raise ValueError("levels and weights must both be dicts with the same aspects, or both sequences.")
        if not levels:
            raise ValueError("levels is empty: pass at least one aspect.")
        if intervals is not None and (not isinstance(intervals, Mapping) or not set(intervals) <= set(levels)):
            raise ValueError("intervals must be a dict with the aspects of levels and weights")
        series = {str(k): (levels[k], weights[k], None if intervals is None else intervals.get(k)) for k in levels}
    else:
        if isinstance(intervals, Mapping):
            raise ValueError("intervals is a dict but levels and weights are sequences; pass one (low, high) per point")
        series = {None: (levels, weights, intervals)}
    fig, ax = figure_and_ax(ax, (4.2, 3.4))
    rhos, sizes = [], []
    for name, (lv, wv, iv) in series.items():
        x = _vector(lv, f"levels[{name!r}]" if name else "levels")
        y = _vector(wv, f"weights[{name!r}]" if name else "weights", x.size)
        if x.size < 2:
            raise ValueError("Spearman's rho needs at least 2 points")
        rho = spearman(x, y)
        rhos.append(rho)
        sizes.append(x.size)
        points = ax.scatter(x, y, s=24, label=f"{name} (ρ = {_rho_text(rho)})" if name else None, zorder=3)
        yerr = _errors(y, iv, f"intervals[{name!r}]" if name else "intervals")
        if yerr is not None:
            ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor=points.get_facecolor()[0], capsize=2, lw=0.8, zorder=2)
        if name is None and labels is not None:
            if len(labels) != x.size:
                raise ValueError(f"labels has {len(labels)} entries for {x.size} points")
            for xi, yi, t in zip(x, y, labels):
                ax.annotate(str(t), (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=7)
    if len(series) == 1:
        head = f"Spearman ρ = {_rho_text(rhos[0])} (n = {sizes[0]})"
    else:
        finite = [r for r in rhos if not np.isnan(r)]
        head = (f"mean Spearman ρ = {np.mean(finite):.2f} over {len(finite)} aspects" if finite
                else "Spearman ρ undefined (constant input)")
        ax.legend(fontsize=7)
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.grid(alpha=0.3)
    return fig


def top1_bars(result: Mapping[str, Any], methods: Sequence[str] = ("naive", "finexl", "finexl_improved", "persviz"),
              groups: Sequence[str] = ("render_single", "lora_single", "style_knob"), ax: Optional[Axes] = None,
              title: Optional[str] = "top-1: the true concept has the highest positive weight") -> Figure:
    """The benchmark's top-1 rates (``persviz.finexl.benchmark.run``'s result, or benchmark.json read back) as
    grouped bars, one group per variant group, one bar per method; error bars: the interval over probe prompts
    where the result has one (``result["intervals"]["summary"]``); the bar labels count the variants, k/n."""
    summary = result.get("summary") if isinstance(result, Mapping) else None
    if not summary:
        raise ValueError("result has no 'summary'; pass persviz.finexl.benchmark.run()'s result or benchmark.json")
    methods = [m for m in methods if m in summary]
    groups = [g for g in groups if any(f"{g}/top1" in summary[m] for m in methods)]
    if not methods or not groups:
        raise ValueError("no top-1 rates of these methods and groups in the result")
    ivs = (result.get("intervals") or {}).get("summary", {})
    counts = {g: sum(1 for r in result.get("variants", {}).values() if r["group"] == g and len(r["truth"]) == 1)
              for g in groups}
    fig, ax = figure_and_ax(ax, (1.2 + 1.6 * len(groups), 3.4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = np.array([summary[m].get(f"{g}/top1", np.nan) for g in groups], dtype=np.float64)
        vals = np.where(np.isfinite(vals), vals, np.nan)
        err = _errors(vals, [(ivs.get(m) or {}).get(f"{g}/top1") for g in groups], f"{m} intervals") if ivs else None
        x = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(x, vals, width, yerr=err, label=m, capsize=2, error_kw={"lw": 0.8})
        if counts and all(counts.values()):
            ax.bar_label(bars, [f"{round(v * counts[g])}/{counts[g]}" if np.isfinite(v) else ""
                                for v, g in zip(vals, groups)], fontsize=6, padding=2)
    ax.set_xticks(np.arange(len(groups)), [g.replace("_", " ") for g in groups])
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("top-1 rate")
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title + ("\nerror bars: 95 % interval over probe prompts" if ivs else ""), fontsize=9)
    return fig


# ----------------------------------------------------------------------------- samples


def paired_strip(base_images: Any, personalized_images: Any, labels: Optional[Sequence[str]] = None,
                 max_pairs: int = 8, ax: Optional[Axes] = None, title: Optional[str] = None,
                 cell_inches: float = 1.0) -> Figure:
    """Two rows, base above personalized, one column per pair (same prompt and seed).

    Args:
        base_images, personalized_images: ``[N, H, W, 3]`` (uint8 or float in [0, 1]) of one size.
        labels: optional column labels (e.g. the prompts), shortened to 34 characters on two lines.
        max_pairs: show the first ``max_pairs`` pairs.
    """
    b, p = check_pairs(base_images, personalized_images, max_pairs, ", resize=")
    n = min(len(b), int(max_pairs))
    cols = None
    if labels is not None:
        if len(labels) < n:
            raise ValueError(f"labels has {len(labels)} entries for {n} pairs")
        cols = [textwrap.fill(textwrap.shorten(str(t), 34, placeholder="..."), 17) for t in labels[:n]]
    return image_grid(np.concatenate([b[:n], p[:n]]), 2, n, row_labels=["base", "personalized"], col_labels=cols,
                      title=title, ax=ax, cell_inches=cell_inches)

"""Pigeon's figures: kept and masked tokens, the ratio sweep, stage-2 pairs, kept noise, the comparison table.

Every function returns the matplotlib Figure and draws on ``ax`` (``axes`` for several panels) when given; none
touches pyplot or rcParams. Images are uint8 [..., S, S, 3] (or floats in [0, 1]); ``persviz.pigeon.study``
produces the inputs (``window_masks``, ``PigeonPipeline.select``, ``pair_examples``, ``kept_noise_by_rate``,
``comparison_table``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from persviz.images import as_uint8
from persviz.pigeon.control import COMPARISONS, holds
from persviz.pigeon.study import METRICS
from persviz.plots import figure_and_ax

NOISE_COLOR = (214, 39, 40)
LIKED_COLOR = (44, 160, 44)
REFERENCE_COLOR = (31, 119, 180)
SELECTED_COLOR = (255, 127, 14)
_MPL = {name: tuple(c / 255 for c in rgb) for name, rgb in
        (("noise", NOISE_COLOR), ("liked", LIKED_COLOR), ("reference", REFERENCE_COLOR), ("selected", SELECTED_COLOR))}


def _grid_side(n_tokens: int) -> int:
    g = int(round(math.sqrt(n_tokens)))
    if g * g != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not form a square patch grid; pass one keep value per patch "
                         f"(n = side x side, e.g. 16 for 8-pixel patches of a 32x32 image)")
    return g


def _enlarged(image: Any, scale: int) -> np.ndarray:
    """An image enlarged ``scale`` times (nearest neighbour), float32 [S*scale, S*scale, 3]."""
    img = as_uint8(image)[0]
    return img.repeat(scale, 0).repeat(scale, 1).astype(np.float32)


def _patch(t: int, g: int, p: float) -> tuple[slice, slice]:
    """The pixel slices of patch ``t`` (row-major) of a g x g grid of p-pixel patches."""
    r, c = divmod(int(t), g)
    return slice(int(r * p), int((r + 1) * p)), slice(int(c * p), int((c + 1) * p))


def _grid_and_frame(big: np.ndarray, g: int | None, frame: tuple[int, int, int] | None, border: int) -> np.ndarray:
    """Lighten the lines between the g x g patches (none for g None) and put the image on a ``frame``-coloured
    border (white without one); uint8."""
    side = big.shape[0]
    p = side / (g or 1)
    for i in range(1, g or 0):
        big[int(i * p), :] = 0.5 * big[int(i * p), :] + 0.5 * 255.0
        big[:, int(i * p)] = 0.5 * big[:, int(i * p)] + 0.5 * 255.0
    out = np.full((side + 2 * border, side + 2 * border, 3), 255, np.uint8)
    if frame is not None:
        out[:] = np.asarray(frame, np.uint8)
    out[border:border + side, border:border + side] = np.clip(big, 0, 255).astype(np.uint8)
    return out


def token_overlay(image: Any, keep: Any = None, frame: tuple[int, int, int] | None = None, scale: int = 4,
                  border: int = 2) -> np.ndarray:
    """One image enlarged ``scale`` times with its patch grid; masked patches (keep 0) darkened and hatched.

    Args:
        image: uint8 [S, S, 3] (or float in [0, 1]).
        keep: None or [n] keep values (1 = kept), n = side**2 patches in row-major order (the ViT's order).
        frame: RGB of a border (e.g. red for a noise image), or None.
        scale: nearest-neighbour enlargement.
        border: frame width in pixels.

    Returns:
        uint8 [S*scale + 2*border, S*scale + 2*border, 3].
    """
    big = _enlarged(image, scale)
    if keep is None:
        return _grid_and_frame(big, None, frame, border)
    k = np.asarray(keep, dtype=np.float32).reshape(-1)
    g = _grid_side(len(k))
    p = big.shape[0] / g
    yy, xx = np.mgrid[0:big.shape[0], 0:big.shape[0]]
    hatch = ((yy + xx) % 6) < 2
    for t in np.flatnonzero(k < 0.5):
        sl = _patch(t, g, p)
        big[sl] = 0.4 * big[sl] + 0.6 * 25.0
        big[sl][hatch[sl]] = 150.0
    return _grid_and_frame(big, g, frame, border)


def truth_overlay(image: Any, marked: Any, color: tuple[int, int, int] = NOISE_COLOR, scale: int = 4,
                  border: int = 2) -> np.ndarray:
    """One image enlarged ``scale`` times with its patch grid and the ``marked`` patches (bool [n], e.g. the
    ground-truth distractor tokens) tinted ``color``; uint8 like ``token_overlay``."""
    big = _enlarged(image, scale)
    mk = np.asarray(marked, dtype=bool).reshape(-1)
    g = _grid_side(len(mk))
    p = big.shape[0] / g
    for t in np.flatnonzero(mk):
        sl = _patch(t, g, p)
        big[sl] = 0.45 * big[sl] + 0.55 * np.asarray(color, np.float32)
    return _grid_and_frame(big, g, None, border)


def _score_tile(scores: Any, size: int, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """Token scores [n] as a colored side x side heat map, enlarged to ``size`` pixels (uint8)."""
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    g = _grid_side(len(s))
    rgb = colormaps[cmap]((s.reshape(g, g) - vmin) / max(vmax - vmin, 1e-8))[..., :3]
    rep = int(math.ceil(size / g))
    tile = (rgb.repeat(rep, 0).repeat(rep, 1)[:size, :size] * 255).astype(np.uint8)
    return tile


def tile_canvas(tiles: Sequence[Sequence[np.ndarray | None]], pad: int = 6,
            row_gap: int | None = None) -> tuple[np.ndarray, list[list[tuple]]]:
    """Tiles (rows of uint8 images; None is a narrow gap) on a white canvas; returns it and each tile's
    (x0, y0, w, h)."""
    h = max(t.shape[0] for row in tiles for t in row if t is not None)
    w = max(t.shape[1] for row in tiles for t in row if t is not None)
    gap = pad if row_gap is None else row_gap
    step = [[(w + pad) if t is not None else max(pad, w // 3) for t in row] for row in tiles]
    width = max(sum(r) for r in step) - pad
    canvas = np.full((len(tiles) * (h + gap) - gap, width, 3), 255, np.uint8)
    boxes: list[list[tuple]] = []
    for r, row in enumerate(tiles):
        boxes.append([])
        x0, y0 = 0, r * (h + gap)
        for c, t in enumerate(row):
            if t is not None:
                canvas[y0:y0 + t.shape[0], x0:x0 + t.shape[1]] = t
            boxes[-1].append((x0, y0, w, h))
            x0 += step[r][c]
    return canvas, boxes


def _show(ax: Axes, canvas: np.ndarray) -> None:
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def mask_overlay(history: Any, reference: Any, history_mask: Any, reference_mask: Any = None,
                 history_is_noise: Any = None, scores: Any = None, title: str | None = None,
                 ax: Axes | None = None, scale: int = 4, distractor_tokens: Any = None) -> Figure:
    """The history and reference with their kept (clear) and masked (dark, hatched) tokens; noise images framed red.

    Args:
        history: uint8 [H, S, S, 3]; reference: uint8 [S, S, 3].
        history_mask: [H, n] keep-mask (1 = kept); reference_mask: [n] or None (reference drawn whole).
        history_is_noise: bool [H] ground truth, or None.
        scores: the mask generator's scores [H + 1, n] (``study.token_scores``): drawn as a second row.
        title: the figure title.
        ax: draw here (one axes); default a new Figure.
        scale: enlargement of each 32-pixel image.
        distractor_tokens: bool [H, n] per-token ground truth (token-level noise, ``study.window_masks``'s
            "history_distractor_tokens"), or None: drawn as a row of the history with the distractor tokens
            tinted red, and each image's label counts the distractor tokens the mask kept.
    """
    hist = as_uint8(history)
    hm = np.asarray(history_mask, dtype=np.float32)
    if hm.ndim != 2 or len(hm) != len(hist):
        raise ValueError(f"history_mask must be [H, n] with H = {len(hist)} history images; got shape {hm.shape}")
    noise = np.zeros(len(hist), bool) if history_is_noise is None else np.asarray(history_is_noise, bool)
    if noise.shape != (len(hist),):
        raise ValueError(f"history_is_noise must hold one flag per history image ({len(hist)}); got {noise.shape}")
    row = [token_overlay(im, m, NOISE_COLOR if nz else (LIKED_COLOR if history_is_noise is not None else None),
                         scale) for im, m, nz in zip(hist, hm, noise)]
    row += [None, token_overlay(reference, reference_mask, REFERENCE_COLOR, scale)]
    tiles = [row]
    if scores is not None:
        sc = np.asarray(scores, dtype=np.float32)
        if sc.shape != (len(hist) + 1, hm.shape[1]):
            raise ValueError(f"scores must be [H + 1, n] = [{len(hist) + 1}, {hm.shape[1]}]; got {sc.shape}")
        size = row[0].shape[0]
        vmin, vmax = float(sc.min()), float(sc.max())
        heat = [_score_tile(s, size, vmin, vmax) for s in sc]
        tiles.append(heat[:-1] + [None, heat[-1]])
    truth = None
    if distractor_tokens is not None:
        truth = np.asarray(distractor_tokens, dtype=bool)
        if truth.shape != hm.shape:
            raise ValueError(f"distractor_tokens must be [H, n] = {list(hm.shape)} like history_mask; got "
                             f"{list(truth.shape)}")
        tiles.append([truth_overlay(im, t, NOISE_COLOR, scale) for im, t in zip(hist, truth)])
    canvas, boxes = tile_canvas(tiles, row_gap=int(9 * scale))
    fig, ax = figure_and_ax(ax, (1.2 * len(row), 1.5 * len(tiles) + 0.6))
    _show(ax, canvas)
    for i, (x0, y0, w, h) in enumerate(boxes[0]):
        if i < len(hist):
            kept = int((hm[i] >= 0.5).sum())
            label = f"{'noise' if noise[i] else 'history'} {i + 1}\n{kept}/{hm.shape[1]} kept"
            if truth is not None:
                label += f", {int(((hm[i] >= 0.5) & truth[i]).sum())}/{int(truth[i].sum())} distr."
            color = _MPL["noise"] if noise[i] else "k"
        elif i == len(hist) + 1:
            kept = len(np.asarray(reference_mask).reshape(-1)) if reference_mask is None else \
                int((np.asarray(reference_mask) >= 0.5).sum())
            label, color = f"reference\n{kept} kept", _MPL["reference"]
        else:
            continue
        ax.text(x0 + w / 2, y0 + h + 2, label, ha="center", va="top", fontsize=7, color=color)
    if scores is not None:
        x0, y0, _, h = boxes[1][0]
        ax.text(x0 - 4, y0 + h / 2, f"scores\n[{vmin:.2f},\n{vmax:.2f}]", ha="right", va="center", fontsize=7)
    if truth is not None:
        x0, y0, _, h = boxes[-1][0]
        ax.text(x0 - 4, y0 + h / 2, "ground\ntruth:\ndistractor\ntokens", ha="right", va="center", fontsize=7,
                color=_MPL["noise"])
    ax.set_ylim(canvas.shape[0] + (int(9 * scale) if len(tiles) == 1 else 0), -2)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def ratio_sweep(selection: Any, index: int = 0, ax: Axes | None = None, scale: int = 4,
                reference: Any = None, reference_masks: Any = None) -> Figure:
    """One request's candidates at every reference mask ratio with CLIP-T, history score and their mean;
    the selected one (``PigeonPipeline.select``) framed orange.

    Args:
        selection: a ``model.Selection`` (``PigeonPipeline.select``).
        index: which request of the batch.
        ax: draw here; default a new Figure.
        reference, reference_masks: optional reference image and its [R, n] keep-masks at the R ratios
            (``study.reference_masks``), drawn above the candidates.
    """
    cands = as_uint8(selection.candidates[index])
    ratios = list(selection.ratios)
    chosen = int(selection.ratio_index[index])
    ct = np.asarray(selection.clip_t[index], dtype=float)
    hs = np.asarray(selection.history_score[index], dtype=float)
    tiles = [[token_overlay(im, None, SELECTED_COLOR if j == chosen else None, scale, border=3)
              for j, im in enumerate(cands)]]
    if reference is not None and reference_masks is not None:
        rm = np.asarray(reference_masks, dtype=np.float32)
        if len(rm) != len(ratios):
            raise ValueError(f"reference_masks has {len(rm)} masks for {len(ratios)} ratios; pass one per ratio")
        tiles.insert(0, [token_overlay(reference, m, REFERENCE_COLOR, scale, border=3) for m in rm])
    fig, ax = figure_and_ax(ax, (1.4 * len(ratios) + 0.4, 1.4 * len(tiles) + 1.4))
    canvas, boxes = tile_canvas(tiles, pad=8)
    _show(ax, canvas)
    for j, (x0, y0, w, h) in enumerate(boxes[-1]):
        total = 0.5 * ct[j] + 0.5 * hs[j]
        txt = f"ratio {ratios[j]:g}\nCLIP-T {ct[j]:.1f}\nhistory {hs[j]:.1f}\nmean {total:.2f}"
        ax.text(x0 + w / 2, y0 + h + 2, txt + ("\nselected" if j == chosen else ""), ha="center", va="top",
                fontsize=7, color=_MPL["selected"] if j == chosen else "k",
                fontweight="bold" if j == chosen else "normal")
    if len(tiles) > 1:
        x0, y0, w, h = boxes[0][0]
        ax.text(x0 - 4, y0 + h / 2, "reference\nkept", ha="right", va="center", fontsize=7, color=_MPL["reference"])
    ax.set_ylim(canvas.shape[0] + 0.55 * boxes[-1][0][3] + 20, -2)
    return fig


def pairs_plot(examples: Sequence[Mapping[str, Any]], ax: Axes | None = None, scale: int = 3) -> Figure:
    """Stage-2 preference pairs (``study.pair_examples``): each row the history, then chosen and rejected with
    their reference ratios and history scores (mean CLIP-I to the history x100)."""
    if not examples:
        raise ValueError("no pairs to draw; pass study.pair_examples(...)")
    tiles = []
    for ex in examples:
        noise = np.asarray(ex.get("history_is_noise", np.zeros(len(ex["history"]), bool)), bool)
        row = [token_overlay(im, None, NOISE_COLOR if nz else LIKED_COLOR, scale)
               for im, nz in zip(ex["history"], noise)]
        row += [None, token_overlay(ex["chosen"], None, LIKED_COLOR, scale, border=3),
                token_overlay(ex["rejected"], None, (120, 120, 120), scale, border=3)]
        tiles.append(row)
    canvas, boxes = tile_canvas(tiles, pad=22)
    fig, ax = figure_and_ax(ax, (1.0 * len(tiles[0]) + 0.5, 1.25 * len(tiles) + 0.6))
    _show(ax, canvas)
    h_len = len(examples[0]["history"])
    for ex, brow in zip(examples, boxes):
        x0, y0, w, h = brow[h_len + 1]
        ax.text(x0 + w / 2, y0 + h + 1, f"chosen r={ex['chosen_ratio']:g}\n{ex['chosen_score']:.1f}",
                ha="center", va="top", fontsize=6, color=_MPL["liked"])
        x0, y0, w, h = brow[h_len + 2]
        ax.text(x0 + w / 2, y0 + h + 1, f"rejected r={ex['rejected_ratio']:g}\n{ex['rejected_score']:.1f}",
                ha="center", va="top", fontsize=6, color="0.35")
        x0, y0, w, h = brow[0]
        w_ = ex.get("window")
        if w_ is not None:
            ax.text(x0, y0 - 1, f"{w_.taste.describe()} · {w_.instruction}", fontsize=6, va="bottom")
    ax.set_title("history (red frame: noise) | chosen | rejected", fontsize=8)
    return fig


def kept_noise_plot(results: Sequence[Mapping[str, Any]], ax: Axes | None = None) -> Figure:
    """Share of kept history tokens from noise images against the noise rate, with the chance line
    (``study.kept_noise_by_rate``): Pigeon's per-image mask, the pooled ranking and the score AUC."""
    if not results:
        raise ValueError("no results to plot; pass study.kept_noise_by_rate(...)")
    x = np.array([r["noise_rate"] for r in results], dtype=float)
    fig, ax = figure_and_ax(ax, (4.2, 3.2))
    ax.plot([0, max(1e-9, x.max())], [0, max(1e-9, x.max())], ls="--", color="0.5", lw=1,
            label="chance (share of noise tokens)")
    ax.plot(x, [r["kept_noise_fraction"] for r in results], "o-", color=_MPL["reference"],
            label="Pigeon's mask (per image)")
    if all("pooled_kept_noise_fraction" in r for r in results):
        ax.plot(x, [r["pooled_kept_noise_fraction"] for r in results], "s-", color=_MPL["noise"],
                label="same scores, ranked over the history")
    for r in results:
        auc = r.get("score_auc")
        if auc is not None and isinstance(auc, float) and math.isfinite(auc):
            ax.annotate(f"AUC {auc:.2f}", (r["noise_rate"], r.get("pooled_kept_noise_fraction", r["chance"])),
                        textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xlabel("noise rate of the history")
    ax.set_ylabel("kept tokens from noise images")
    ax.set_xlim(-0.03, max(0.65, x.max() + 0.05))
    ax.set_ylim(-0.03, max(0.65, x.max() + 0.05))
    ax.legend(fontsize=7, loc="upper left")
    return fig


DEFAULT_BAR_METRICS = ("clip_i", "dino_i", "taste", "clip_t", "shape")


def _bar_errors(rows: Sequence[Mapping[str, Any] | None], metric: str, values: Sequence[float]) -> Any:
    """Error bars of one row's bars: [2, N] distances to the interval's ends where every present row has an
    interval of ``metric``, else the SEMs ([N]), else None."""
    present = [r for r in rows if r is not None]
    if present and all(metric in (r.get("intervals") or {}) for r in present):
        err = np.full((2, len(rows)), np.nan)
        for i, (r, v) in enumerate(zip(rows, values)):
            if r is not None and np.isfinite(v):
                iv = r["intervals"][metric]
                err[:, i] = [max(0.0, v - float(iv["low"])), max(0.0, float(iv["high"]) - v)]
        return err
    sem = [None if r is None else r.get(f"{metric}_sem") for r in rows]
    return None if all(e is None for e in sem) else [np.nan if e is None else float(e) for e in sem]


def comparison_bars(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = DEFAULT_BAR_METRICS,
                    axes: Sequence[Axes] | None = None) -> Figure:
    """The comparison table as grouped bars: one panel per metric, noise rates on x, one bar per row
    (error bars: the bootstrap 95 % interval over windows where the rows have "intervals", as
    ``comparison_table`` writes them, else the standard error where the table has one); bars start at 0, read
    small gaps in the table."""
    if not rows:
        raise ValueError("no rows to plot; pass comparison_table(...) or load_comparison(path)[0]")
    labels = {k: lab for k, lab, _ in METRICS}
    rates = sorted({float(r["noise_rate"]) for r in rows})
    names = list(dict.fromkeys(r["row"] for r in rows))
    own = axes is None
    if own:
        fig = Figure(figsize=(3.0 * len(metrics), 3.4), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, len(metrics))))
    else:
        axes = list(axes)
        if len(axes) != len(metrics):
            raise ValueError(f"got {len(axes)} axes for {len(metrics)} metrics; pass one axes per metric")
        fig = axes[0].figure
    width = 0.8 / len(names)
    colors = colormaps["tab10"]
    for ax, m in zip(axes, metrics):
        vals_all = []
        for i, name in enumerate(names):
            by_rate = {float(r["noise_rate"]): r for r in rows if r["row"] == name}
            vals = [by_rate[x].get(m, np.nan) if x in by_rate else np.nan for x in rates]
            vals = [np.nan if v is None else float(v) for v in vals]
            err = _bar_errors([by_rate.get(x) for x in rates], m, vals)
            ax.bar(np.arange(len(rates)) + (i - (len(names) - 1) / 2) * width, vals, width, yerr=err,
                   color=colors(i), label=name, capsize=2, error_kw={"lw": 0.8})
            vals_all += [v for v in vals if np.isfinite(v)]
        ax.set_xticks(np.arange(len(rates)), [f"{x:g}" for x in rates])
        ax.set_xlabel("noise rate")
        ax.set_title(labels.get(m, m), fontsize=9)
        if not vals_all or (min(vals_all) >= 0.0 and max(vals_all) <= 1.0):  # oracle rates: the full [0, 1]
            ax.set_ylim(0, 1.05)
        ax.axhline(0.0, color="0.3", lw=0.6)
    if own:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(names), fontsize=8)
    else:
        axes[0].legend(fontsize=7, loc="lower left")
    return fig


__all__ = ["comparison_bars", "kept_noise_plot", "mask_overlay", "pairs_plot", "ratio_sweep", "token_overlay",
           "truth_overlay"]


def control_differences(tables: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "any_taste",
                        comparisons: Sequence[tuple[str, str]] | None = None, ax: Axes | None = None) -> Figure:
    """The perfect-mask control's paired differences (``control.control_table`` rows) as a forest plot: one panel per
    table (e.g. {"token": rows, "decoy": rows}), one line per (comparison, noise rate), the mean difference of
    ``metric`` with its bootstrap 95 % interval; a filled marker where the pre-registered criterion holds
    (``control.holds``), an open one elsewhere."""
    comparisons = list(COMPARISONS[:3] if comparisons is None else comparisons)
    if not tables:
        raise ValueError("no tables; pass {regime: control_table rows}")
    labels = {k: lab for k, lab, _ in METRICS}
    names = list(tables)
    if ax is None:
        fig = Figure(figsize=(4.2 * len(names), 0.45 * len(comparisons) * 2 + 1.4), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, len(names), sharex=True)))
    else:
        if len(names) != 1:
            raise ValueError("one axes takes one table; pass ax=None for several")
        fig, axes = ax.figure, [ax]
    colors = colormaps["tab10"]
    for a, name in zip(axes, names):
        rows = tables[name]
        rates = sorted({float(r["noise_rate"]) for r in rows})
        y, ticks = 0, []
        for ci, (row, ref) in enumerate(comparisons):
            for rate in rates:
                r = next((x for x in rows if x["key"] == row and float(x["noise_rate"]) == rate), None)
                d = None if r is None else (r.get(f"vs_{ref}") or {}).get(metric)
                ticks.append(f"{row} − {ref} @ {rate:g}")
                if d is not None:
                    ok = holds(d)
                    a.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                               color=colors(ci), mfc=colors(ci) if ok else "white", capsize=3, lw=1.2)
                y -= 1
        a.axvline(0.0, color="0.3", lw=0.7)
        a.set_yticks(np.arange(0, y, -1), ticks, fontsize=8)
        a.set_title(f"{name}: {labels.get(metric, metric)}", fontsize=9)
        a.set_xlabel("paired difference (95 % interval over windows)")
    return fig

"""Reading a saved sweep (``persviz sweep``'s sweep.json, an Evaluation with one condition per rotation x scale):
each cell's mean and interval on the grid, and which cells differ from the untouched token after correction."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from persviz.evaluation import Evaluation
from persviz.stats import N_BOOT, bootstrap_mean, holm
from persviz.tea.sweep import UNTOUCHED, condition


def sweep_arrays(ev: Evaluation, metric: str, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """A saved sweep's metric on its grid: {'rotations', 'scales', 'mean', 'low', 'high'} (arrays [R, S]; the
    evaluation protocol's nested bootstrap interval per cell), for persviz.tea.plots.sweep_heatmap / sweep_lines."""
    grid = ev.meta.get("grid")
    if not grid:
        raise ValueError("this evaluation has no sweep grid in its meta; write it with `persviz sweep`")
    r, s = grid["rotations"], grid["scales"]
    out = {k: np.full((len(r), len(s)), np.nan) for k in ("mean", "low", "high")}
    for i, rot in enumerate(r):
        for j, sc in enumerate(s):
            iv = bootstrap_mean(ev.grouped(condition(rot, sc), metric)[1], n_boot, seed=seed)
            out["mean"][i, j], out["low"][i, j], out["high"][i, j] = iv.mean, iv.low, iv.high
    return {"rotations": list(r), "scales": list(s), **out}


def sweep_effects(ev: Evaluation, metrics: Optional[Sequence[str]] = None, n_boot: int = N_BOOT,
                  alpha: float = 0.05) -> list[dict[str, Any]]:
    """Which cells of a saved sweep differ from the untouched token (rotation 0, scale 0), per metric: one row per
    (cell, metric) with the paired difference, its interval, Wilcoxon p and Holm's p across every cell and metric
    of the table (the family of the sweep), and whether it holds (Holm p < alpha)."""
    base = condition(0.0, 0.0)
    if base not in ev.items:
        raise ValueError("the sweep has no rotation 0, scale 0 cell to compare with; include 0 in both knobs")
    metrics = list(metrics or ev.metrics())
    raw = []
    for cond in ev.conditions:
        if cond in (base, UNTOUCHED):
            continue
        for m, d in ev.compare(base, cond, metrics, n_boot=n_boot).items():
            raw.append((cond, m, d))
    adjusted = holm([d.p for _, _, d in raw])
    return [{"cell": c, "metric": m, "difference": d.mean, "low": d.low, "high": d.high, "p": d.p, "p_holm": q,
             "holds": bool(q < alpha), "prompts": d.n_prompts} for (c, m, d), q in zip(raw, adjusted)]

def showcase(ev: Evaluation, metric: Optional[str] = None, keep: Optional[str] = None) -> dict[str, Any]:
    """The image of a saved sweep where TEA raises `metric` most over the same prompt and seed at rotation 0, scale 0.

    metric: default "oracle_context" (the ground truth) when the sweep has it, else "clip_t_context". Ties go to an
    image whose `keep` (default "oracle_concept" when present) is highest after TEA (the object stays the concept),
    then to the smallest rotation, then scale. Returns {'prompt' (a template with {} for the token), 'seed',
    'rotation', 'scale', 'metric', 'before', 'after', 'gain', 'keep', 'kept', 'searched' (images compared)}."""
    grid = ev.meta.get("grid")
    if not grid:
        raise ValueError("this evaluation has no sweep grid in its meta; write it with `persviz sweep`")
    base = condition(0.0, 0.0)
    if base not in ev.items:
        raise ValueError("the sweep has no rotation 0, scale 0 cell to compare with; include 0 in both knobs")
    metrics = ev.metrics(base)
    metric = metric or ("oracle_context" if "oracle_context" in metrics else "clip_t_context")
    keep = keep or ("oracle_concept" if "oracle_concept" in metrics else None)
    if metric not in metrics:
        raise ValueError(f"the sweep has no {metric!r}; it has {metrics}")

    def by_image(cond: str, m: str) -> dict[tuple[str, int], float]:
        it = ev.items[cond]
        return {(p, int(sd)): float(x) for p, sd, x in zip(it["prompt"], it["seed"], it[m])}

    before = by_image(base, metric)
    best, best_key, searched = None, None, 0
    for rot in sorted(grid["rotations"]):
        for sc in sorted(grid["scales"]):
            cond = condition(rot, sc)
            if cond == base or cond not in ev.items:
                continue
            after = by_image(cond, metric)
            kept = by_image(cond, keep) if keep else {}
            for img, x in after.items():
                searched += 1
                key = (x - before[img], kept.get(img, 0.0))
                if best_key is None or key > best_key:  # strictly better: ties keep the smaller knobs
                    best_key = key
                    best = {"prompt": img[0], "seed": img[1], "rotation": float(rot), "scale": float(sc),
                            "metric": metric, "before": before[img], "after": x, "gain": x - before[img],
                            "keep": keep, "kept": kept.get(img)}
    if best is None:
        raise ValueError("the sweep has no cell besides rotation 0, scale 0")
    return {**best, "searched": searched}


__all__ = ["showcase", "sweep_arrays", "sweep_effects"]

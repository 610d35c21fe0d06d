"""The statistics of the evaluation protocol (docs/evaluation.md): nested bootstrap intervals of a mean over
prompts with seeds nested in prompts, paired differences with a Wilcoxon signed-rank p-value over prompts, and
Holm's correction across the metrics of one table.

Values come grouped by prompt: a list of per-prompt sequences (the seeds of that prompt; lengths may differ), or
an array [P, S]. The statistic is the mean over prompts of each prompt's mean over its seeds, so every prompt
weighs the same whatever its number of seeds (with one seed per prompt it is the plain mean).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
from scipy.stats import wilcoxon

N_BOOT = 10_000
LEVEL = 0.95
Grouped = Union[np.ndarray, Sequence[Sequence[float]]]


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval, and the counts behind it."""

    mean: float
    low: float
    high: float
    n_prompts: int
    n_images: int
    level: float = LEVEL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclass(frozen=True)
class Difference(Interval):
    """A paired difference (b - a) with its interval, Wilcoxon p over prompts and Holm's adjusted p (set by
    holm_table)."""

    p: float = float("nan")
    p_holm: float = float("nan")

    def __str__(self) -> str:
        return f"{self.mean:+.4g} [{self.low:+.4g}, {self.high:+.4g}], p={self.p:.3g} (Holm {self.p_holm:.3g})"


def as_groups(values: Grouped, name: str = "values") -> list[np.ndarray]:
    """Per-prompt float64 arrays, each non-empty and finite; a ValueError naming what is wrong."""
    if isinstance(values, np.ndarray):
        if values.ndim != 2:
            raise ValueError(f"{name} must be grouped by prompt, shape [prompts, seeds]; got shape {values.shape}")
        groups = [np.asarray(row, dtype=np.float64) for row in values]
    else:
        groups = [np.asarray(g, dtype=np.float64).reshape(-1) for g in values]
    if not groups:
        raise ValueError(f"{name} holds no prompt; pass at least one prompt's scores")
    empty = [i for i, g in enumerate(groups) if g.size == 0]
    if empty:
        raise ValueError(f"{name}: prompt {empty[0]} has no score; drop it or give it at least one seed")
    bad = [i for i, g in enumerate(groups) if not np.all(np.isfinite(g))]
    if bad:
        raise ValueError(f"{name}: prompt {bad[0]} has a NaN or infinite score; the bootstrap needs finite values")
    return groups


def grouped_mean(groups: Sequence[np.ndarray]) -> float:
    """The mean over prompts of each prompt's mean."""
    return float(np.mean([g.mean() for g in groups]))


def bootstrap_draws(groups: Sequence[np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """n_boot nested bootstrap replicates of grouped_mean: prompts drawn with replacement, then, within each drawn
    prompt, its seeds drawn with replacement. float64 [n_boot]."""
    rng = np.random.default_rng(seed)
    p = len(groups)
    counts = np.array([g.size for g in groups])
    width = int(counts.max())
    padded = np.zeros((p, width))
    for i, g in enumerate(groups):
        padded[i, :g.size] = g
    which = rng.integers(0, p, size=(n_boot, p))  # drawn prompts
    if width == 1:
        return padded[which, 0].mean(axis=1)
    k = counts[which]  # [B, P] seeds of each drawn prompt
    cols = np.floor(rng.random((n_boot, p, width)) * k[..., None]).astype(np.int64)  # seeds drawn in each prompt
    taken = padded[which[..., None], cols]  # [B, P, W]
    mask = np.arange(width)[None, None, :] < k[..., None]
    return ((taken * mask).sum(-1) / k).mean(axis=1)


def bootstrap_mean(values: Grouped, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean over prompts (seeds nested) with its percentile bootstrap interval at `level` (10,000 seeded draws)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    groups = as_groups(values)
    draws = bootstrap_draws(groups, n_boot, seed)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(grouped_mean(groups), float(lo), float(hi), len(groups), int(sum(g.size for g in groups)), level)


def wilcoxon_p(per_prompt: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of per-prompt differences (scipy; exact for small samples without
    ties); 1.0 when every difference is zero, NaN with fewer than two prompts."""
    d = np.asarray(per_prompt, dtype=np.float64)
    if d.size < 2:
        return float("nan")
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_difference(a: Grouped, b: Grouped, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Difference:
    """b - a on the same prompts and seeds (item by item): the mean difference with its nested bootstrap interval and
    the Wilcoxon p-value over the per-prompt mean differences (Holm's p is left NaN: holm_table sets it)."""
    ga, gb = as_groups(a, "a"), as_groups(b, "b")
    if len(ga) != len(gb) or any(x.size != y.size for x, y in zip(ga, gb)):
        raise ValueError(f"a and b must hold the same prompts and seeds to be paired; got {[x.size for x in ga]} "
                         f"and {[y.size for y in gb]} seeds per prompt")
    diff = [y - x for x, y in zip(ga, gb)]
    iv = bootstrap_mean(diff, n_boot, level, seed)
    return Difference(**asdict(iv), p=wilcoxon_p([d.mean() for d in diff]))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaNs stay NaN and do not count."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def holm_table(differences: dict[str, Difference]) -> dict[str, Difference]:
    """The same differences with p_holm set, Holm-corrected across them (the metrics of one table)."""
    names = list(differences)
    adjusted = holm([differences[k].p for k in names])
    return {k: Difference(**{**asdict(differences[k]), "p_holm": q}) for k, q in zip(names, adjusted)}


__all__ = ["Difference", "Interval", "LEVEL", "N_BOOT", "bootstrap_draws", "bootstrap_mean", "grouped_mean", "holm",
           "holm_table", "paired_difference", "wilcoxon_p"]

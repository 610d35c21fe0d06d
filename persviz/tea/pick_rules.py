"""The picker's rules (docs/pick.md §2-§4), as pure functions of numbers: the Pareto front, the recommendation,
the collapse step, the signal's predicted step and the rank correlation with its bootstrap interval.

An interval is anything with ``mean``, ``low`` and ``high`` (persviz.stats.Interval), a mapping with those keys, or
a (mean, low, high) triple. Steps come in increasing order with step 0 first.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from persviz.errors import PersvizError
from persviz.metrics import spearman
from persviz.stats import N_BOOT

#: a run with no collapse step (or a signal that never crosses) is put one snapshot past its last (docs/pick.md §4)
NOT_WITHIN = "not within the run"


class PickError(PersvizError, ValueError):
    """Bad input to the picker's rules: one sentence naming the problem and the fix."""


def mlh(x: Any) -> tuple[float, float, float]:
    """(mean, low, high) of an interval given as an object, a mapping or a triple."""
    if isinstance(x, Mapping):
        return float(x["mean"]), float(x["low"]), float(x["high"])
    if hasattr(x, "mean") and hasattr(x, "low") and hasattr(x, "high"):
        return float(x.mean), float(x.low), float(x.high)
    m, lo, hi = x
    return float(m), float(lo), float(hi)


def _check_steps(steps: Sequence[int], *series: Sequence[Any]) -> list[int]:
    steps = [int(s) for s in steps]
    if not steps:
        raise PickError("no checkpoint given; pass the steps of at least one checkpoint")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise PickError(f"the steps must increase; got {steps}")
    for s in series:
        if len(s) != len(steps):
            raise PickError(f"{len(s)} values for {len(steps)} steps; give one per step")
    return steps


def pareto_front(identity: Sequence[float], context: Sequence[float]) -> list[bool]:
    """Which points are on the front of (identity, context), both maximised: no other point is at least as high on
    both and higher on one. Equal points are all on the front."""
    x, y = np.asarray(identity, dtype=float), np.asarray(context, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise PickError(f"identity and context must be two lists of one length; got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise PickError("a mean is NaN or infinite; evaluate every checkpoint before drawing the front")
    ge = (x[None, :] >= x[:, None]) & (y[None, :] >= y[:, None])
    gt = (x[None, :] > x[:, None]) | (y[None, :] > y[:, None])
    return [not bool((ge[i] & gt[i]).any()) for i in range(len(x))]


def collapse_step(steps: Sequence[int], context: Sequence[Any]) -> Optional[int]:
    """The first step k > 0 whose context interval lies wholly below step 0's (its high < step 0's low); None when
    there is none. steps[0] must be 0."""
    steps = _check_steps(steps, context)
    if steps[0] != 0:
        raise PickError(f"the collapse step is measured against step 0; the steps start at {steps[0]}")
    low0 = mlh(context[0])[1]
    return next((k for k, c in zip(steps[1:], context[1:]) if mlh(c)[2] < low0), None)


def recommend(steps: Sequence[int], identity: Sequence[Any], context: Sequence[Any]) -> dict[str, Any]:
    """docs/pick.md §2: the earliest step k > 0 whose identity mean is at least the lower bound of the best step's
    identity interval and whose context interval does not lie wholly below step 0's. Returns {'step', 'best',
    'eligible', 'collapsed'} ('collapsed': no step was eligible, and 'step' is then the best)."""
    steps = _check_steps(steps, identity, context)
    if steps[0] != 0 or len(steps) < 2:
        raise PickError(f"the rule needs step 0 and at least one later checkpoint; got steps {steps}")
    ids = [mlh(i) for i in identity]
    low0 = mlh(context[0])[1]
    later = range(1, len(steps))
    best = max(later, key=lambda i: (ids[i][0], -i))
    floor = ids[best][1]
    eligible = [steps[i] for i in later if ids[i][0] >= floor and mlh(context[i])[2] >= low0]
    return {"step": eligible[0] if eligible else steps[best], "best": steps[best], "eligible": eligible,
            "collapsed": not eligible}


def predicted_step(steps: Sequence[int], percentiles: Sequence[float], tail: float) -> Optional[int]:
    """The first step k > 0 at which |V*| lies beyond the `tail` percentile of the vocabulary's row norms (a NaN
    norm counts as beyond); None when it never does."""
    steps = _check_steps(steps, percentiles)
    return next((k for k, p in zip(steps, percentiles) if k > 0 and (p is None or not p <= tail)), None)


def censored(step: Optional[int], past: int) -> int:
    """A step, or `past` when there is none (docs/pick.md §4: one snapshot past the last)."""
    return int(past) if step is None else int(step)


def spearman_interval(x: Sequence[float], y: Sequence[float], n_boot: int = N_BOOT, level: float = 0.95,
                      seed: int = 0, max_tries: int = 100) -> dict[str, Any]:
    """Spearman's rho of paired values with a percentile bootstrap over the pairs: {'rho', 'low', 'high', 'n',
    'n_boot'}. A draw in which either side is constant is drawn again (up to max_tries times each); rho is NaN when
    either side is constant in the data itself."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 3:
        raise PickError(f"the rank correlation needs two lists of one length, at least 3 pairs; got {a.shape}, {b.shape}")
    rho = spearman(a, b)
    out: dict[str, Any] = {"rho": rho, "low": float("nan"), "high": float("nan"), "n": int(a.size), "n_boot": 0}
    if rho != rho:
        return out
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        for _ in range(max_tries):
            i = rng.integers(0, a.size, a.size)
            r = spearman(a[i], b[i])
            if r == r:
                draws.append(r)
                break
    q = (1 - level) / 2
    out.update(low=float(np.quantile(draws, q)), high=float(np.quantile(draws, 1 - q)), n_boot=len(draws))
    return out


def verdict(result: Mapping[str, Any], n_collapsed: int, min_rho: float = 0.5, min_collapsed: int = 5) -> dict[str, Any]:
    """docs/pick.md §4: the signal predicts when rho >= 0.5, the interval's low > 0 and >= 5 runs collapse."""
    rho, low = result.get("rho"), result.get("low")
    enough = n_collapsed >= min_collapsed
    ok = enough and rho is not None and rho == rho and rho >= min_rho and low is not None and low > 0
    if not enough:
        why = f"only {n_collapsed} of {result.get('n')} runs collapsed (at least {min_collapsed} needed)"
    elif ok:
        why = f"rho {rho:.2f} >= {min_rho} and the interval's low {low:.2f} > 0"
    else:
        why = f"rho {rho:.2f} [{low:.2f}, {result.get('high'):.2f}] misses rho >= {min_rho} with a low > 0"
    return {"predicts": bool(ok), "why": why, "n_collapsed": int(n_collapsed)}


__all__ = ["NOT_WITHIN", "PickError", "censored", "collapse_step", "mlh", "pareto_front", "predicted_step",
           "recommend", "spearman_interval", "verdict"]

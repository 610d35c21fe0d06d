"""persviz.metrics.spearman, the one Spearman of persviz: scipy.stats.spearmanr's value, ties included; NaN when a
side is constant or there are fewer than 2 points."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from persviz.metrics import spearman


@pytest.mark.parametrize("x, y", [
    ([0.33, 0.67, 1.0, 0.5], [0.1, 0.3, 0.2, 0.25]),           # no ties
    ([1, 2, 2, 3, 4], [0.5, 0.1, 0.1, 0.9, 0.9]),               # ties on both sides
    ([0.2, 0.2, 0.2, 0.8], [1.0, 2.0, 3.0, 4.0]),                # a three-way tie
    ([1, 2, 3, 4, 5, 6], [6, 5, 5, 5, 2, 1]),                    # ties, negative
    ([0, 0, 1, 1], [0, 1, 0, 1]),                                # ties, rho = 0
])
def test_spearman_equals_scipy_with_ties(x, y):
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(np.array(x), torch.tensor(y)) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_random_ties_against_scipy():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 30))
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)  # many ties
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            assert math.isnan(spearman(x, y))
        else:
            assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_monotone_and_undefined_cases():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 2], [5, 5]))        # a constant side: no ranking
    assert math.isnan(spearman([7, 7, 7], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))              # fewer than 2 points
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2, 3], [1, 2])

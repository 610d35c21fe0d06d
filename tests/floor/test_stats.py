"""The protocol's statistics against independent references: scipy's bootstrap, the nested bootstrap's
closed-form variance, exact Wilcoxon p-values and Holm's adjustment worked by hand."""
import numpy as np
import pytest
from scipy import stats as st

from persviz.stats import (bootstrap_draws, bootstrap_mean, grouped_mean, holm, holm_table, paired_difference,
                           wilcoxon_p)


def test_one_seed_interval_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=40)
    ours = bootstrap_mean(x[:, None], n_boot=20_000, seed=0)
    ref = st.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                       random_state=np.random.default_rng(5)).confidence_interval
    assert ours.mean == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.05) and ours.high == pytest.approx(ref.high, abs=0.05)
    assert (ours.n_prompts, ours.n_images) == (40, 40)


def test_nested_bootstrap_spread_matches_its_closed_form():
    rng = np.random.default_rng(2)
    P, S = 30, 3
    values = rng.normal(0, 1, size=(P, 1)) + rng.normal(0, 0.5, size=(P, S))  # prompt effect + seed noise
    draws = bootstrap_draws([row for row in values], n_boot=40_000, seed=3)
    means = values.mean(1)
    # a drawn prompt's resampled mean has variance var(prompt means) + its biased within variance / S
    expected = np.sqrt((np.mean((means - means.mean()) ** 2) + np.mean(values.var(1) / S)) / P)
    assert draws.mean() == pytest.approx(values.mean(), abs=0.01)
    assert draws.std() == pytest.approx(expected, rel=0.03)
    # seeds nested in prompts: wider than resampling prompt means alone
    assert draws.std() > bootstrap_draws([np.array([m]) for m in means], 40_000, 3).std() * 1.02


def test_prompts_weigh_the_same_whatever_their_seeds():
    groups = [[1.0, 1.0, 1.0, 1.0], [3.0]]
    assert bootstrap_mean(groups, n_boot=200).mean == grouped_mean([np.array(g) for g in groups]) == 2.0


def test_draws_are_seeded():
    g = [np.arange(5.0), np.arange(3.0) * 2]
    assert np.array_equal(bootstrap_draws(g, 100, 7), bootstrap_draws(g, 100, 7))
    assert not np.array_equal(bootstrap_draws(g, 100, 7), bootstrap_draws(g, 100, 8))


def test_wilcoxon_exact_values_by_hand():
    # 5 positive differences, distinct ranks: only 1 of the 2^5 sign patterns is as extreme on each side
    assert wilcoxon_p([0.5, 1.0, 1.5, 2.0, 2.5]) == pytest.approx(2 / 32)
    # ranks 1..4, one negative at rank 1: W- = 1; P(W- <= 1) = 2/16, two-sided 4/16
    assert wilcoxon_p([-0.1, 0.2, 0.3, 0.4]) == pytest.approx(4 / 16)
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0 and np.isnan(wilcoxon_p([1.0]))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, float("nan"), 0.9])
    assert out[0] == pytest.approx(0.4) and np.isnan(out[1]) and out[2] == pytest.approx(0.9)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_paired_difference_of_a_constant_shift():
    a = np.random.default_rng(4).normal(size=(12, 2))
    d = paired_difference(a, a + 1.0, n_boot=500)
    assert d.mean == pytest.approx(1.0) and d.low == pytest.approx(1.0) and d.high == pytest.approx(1.0)
    assert d.p == pytest.approx(2 / 2 ** 12) and np.isnan(d.p_holm)
    table = holm_table({"x": d, "y": paired_difference(a, a, n_boot=100)})
    assert table["x"].p_holm == pytest.approx(2 * d.p) and table["y"].p_holm == 1.0


@pytest.mark.parametrize("values, match", [([], "no prompt"), ([[1.0], []], "prompt 1 has no score"),
                                           ([[1.0, float("nan")]], "NaN"), (np.zeros(3), "grouped by prompt")])
def test_bad_values_are_named(values, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_mean(values)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_difference([[1.0, 2.0]], [[1.0]])

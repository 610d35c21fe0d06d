"""Semantic-shift metrics against independent references: scipy, sklearn, numpy, hand-worked values."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, directed_hausdorff, mahalanobis, pdist
from scipy.special import rel_entr
from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage as sk_lw_shrinkage

from persviz.tea import reference as ref
from persviz.tea import shift as sm


def _sets(n=12, m=9, shape=(7, 8), seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(n, *shape, generator=g) + offset
    Q = 1.5 * torch.randn(m, *shape, generator=g) + offset + 0.5
    return P, Q


def _flat(X):
    return np.asarray(X, dtype=np.float64).reshape(len(X), -1)


# ----------------------------------------------------------------------------- L2, Hausdorff


def test_l2_matches_scipy_cdist_on_flattened_hidden_states():
    P, Q = _sets()
    assert sm.l2_distance(P, Q) == pytest.approx(cdist(_flat(P), _flat(Q)).mean(), rel=1e-12)
    assert sm.l2_distance(P.numpy(), Q.numpy()) == pytest.approx(sm.l2_distance(P, Q), rel=1e-14)
    np.testing.assert_allclose(sm.pairwise_distances(P, Q).numpy(), cdist(_flat(P), _flat(Q)), rtol=1e-12)


def test_intra_l2_is_the_mean_over_pairs_i_ne_j():
    P, _ = _sets()
    assert sm.intra_l2(P) == pytest.approx(pdist(_flat(P)).mean(), rel=1e-12)
    # hand-worked: points 0, 1, 3 on a line -> distances 1, 3, 2 -> mean 2
    assert sm.intra_l2(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0, abs=1e-12)


def test_hausdorff_matches_scipy_directed_hausdorff_both_ways():
    P, Q = _sets(seed=1)
    Pf, Qf = _flat(P), _flat(Q)
    expected = max(directed_hausdorff(Pf, Qf)[0], directed_hausdorff(Qf, Pf)[0])
    assert sm.hausdorff_distance(P, Q) == pytest.approx(expected, rel=1e-12)
    # asymmetric hand example: P = {0}, Q = {0, 10} -> max(0, 10) = 10
    assert sm.hausdorff_distance(torch.tensor([[0.0]]), torch.tensor([[0.0], [10.0]])) == pytest.approx(10.0)


def test_intra_hausdorff_is_the_largest_nearest_neighbour_distance():
    P, _ = _sets(seed=2)
    d = cdist(_flat(P), _flat(P))
    np.fill_diagonal(d, np.inf)
    assert sm.intra_hausdorff(P) == pytest.approx(d.min(axis=1).max(), rel=1e-12)
    # hand-worked: 0, 1, 5 -> nearest neighbours at 1, 1, 4 -> 4
    assert sm.intra_hausdorff(torch.tensor([[0.0], [1.0], [5.0]])) == pytest.approx(4.0, abs=1e-12)


def test_duplicates_far_from_the_origin_give_distance_near_zero():
    # CLIP hidden states have large norms; centring keeps the Gram-trick distances accurate
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 768, generator=g, dtype=torch.float64) * 0.01 + 300.0
    P = torch.stack([x, x, y, y])
    assert sm.intra_hausdorff(P) == 0.0
    assert sm.hausdorff_distance(P, P.flip(0)) == 0.0
    assert sm.intra_l2(P) == pytest.approx(float((x - y).norm()) * 8 / 12, rel=1e-7)


# ----------------------------------------------------------------------------- Mahalanobis


def _np_pinv_mahalanobis(P, Q, rcond=1e-15):
    Pf, Qf = _flat(P), _flat(Q)
    VI = np.linalg.pinv(np.cov(Qf, rowvar=False), rcond=rcond)
    mu = Qf.mean(axis=0)
    return float(np.mean([mahalanobis(x, mu, VI) for x in Pf]))


def test_mahalanobis_pinv_full_rank_matches_scipy_with_numpy_cov():
    P, Q = _sets(n=10, m=60, shape=(5,), seed=4)
    assert sm.mahalanobis_distance(P, Q) == pytest.approx(_np_pinv_mahalanobis(P, Q), rel=1e-10)


def test_mahalanobis_pinv_rank_deficient_matches_numpy_pinv():
    # M = 8 samples in D = 30: Cov(Q) has rank 7; the Gram path (auto) and the explicit path agree
    P, Q = _sets(n=6, m=8, shape=(30,), seed=5)
    expected = _np_pinv_mahalanobis(P, Q, rcond=1e-10)
    assert sm.mahalanobis_distance(P, Q) == pytest.approx(expected, rel=1e-9)
    P2, Q2 = sm.as_pair(P, Q)
    gram = sm.mahalanobis_sq(P2, Q2, "pinv", path="gram")
    explicit = sm.mahalanobis_sq(P2, Q2, "pinv", path="explicit")
    np.testing.assert_allclose(gram.numpy(), explicit.numpy(), rtol=1e-9)


def test_mahalanobis_pinv_at_clip_size_equals_the_small_dimensional_problem():
    # 200 prompts x [77, 768] (59136 dims): embed a 20-dim problem isometrically; pinv-Mahalanobis is
    # invariant under the embedding, so the Gram path must reproduce the explicit 20 x 20 computation
    g = torch.Generator().manual_seed(6)
    small_q = torch.randn(200, 20, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 20, dtype=torch.float64)
    small_p = torch.randn(20, 20, generator=g, dtype=torch.float64) + 0.3
    # orthonormal columns: random unit vectors on 20 disjoint random coordinate subsets (dense overall)
    W = torch.randn(77 * 768, generator=g, dtype=torch.float64)[:, None] * (
        torch.randperm(77 * 768, generator=g)[:, None] % 20 == torch.arange(20)
    )
    W = W / W.norm(dim=0)
    shift = torch.randn(77 * 768, generator=g, dtype=torch.float64) * 5
    big_q = (small_q @ W.T + shift).reshape(200, 77, 768)
    big_p = (small_p @ W.T + shift).reshape(20, 77, 768)
    expected = _np_pinv_mahalanobis(small_p, small_q)
    assert sm.mahalanobis_distance(small_p, small_q) == pytest.approx(expected, rel=1e-10)
    assert sm.mahalanobis_distance(big_p, big_q) == pytest.approx(expected, rel=1e-8)


def test_mahalanobis_pinv_generic_large_dimension_matches_gram_identity():
    # 80 generic samples in 10000 dims (rank 79): d^2 = (M-1) b^T pinv(G)^2 b with b = X y, G = X X^T
    g = torch.Generator().manual_seed(7)
    Q = torch.randn(80, 10000, generator=g, dtype=torch.float64)
    P = torch.randn(5, 10000, generator=g, dtype=torch.float64) * 0.5 + Q[:5]
    mu = Q.numpy().mean(0)
    X, Y = Q.numpy() - mu, P.numpy() - mu
    Gp = np.linalg.pinv(X @ X.T, rcond=1e-10, hermitian=True)
    b = Y @ X.T @ Gp
    expected = np.sqrt(79 * (b * b).sum(1)).mean()
    assert sm.mahalanobis_distance(P, Q) == pytest.approx(expected, rel=1e-8)


def test_intra_mahalanobis_pinv_is_degenerate_when_n_le_d():
    # a known property that motivates Ledoit-Wolf: every sample sits at sqrt((N-1)^2 / N)
    P, _ = _sets(n=15, m=2, shape=(40,), seed=8)
    assert sm.intra_mahalanobis(P, covariance="pinv") == pytest.approx(14 / math.sqrt(15), rel=1e-9)
    assert sm.intra_mahalanobis(P) != pytest.approx(14 / math.sqrt(15), rel=1e-3)


@pytest.mark.parametrize("m,d", [(60, 5), (30, 120), (7, 7), (3, 50)])
def test_ledoit_wolf_matches_sklearn(m, d):
    P, Q = _sets(n=9, m=m, shape=(d,), seed=9 + d)
    Qf, Pf = _flat(Q), _flat(P)
    lw = LedoitWolf().fit(Qf)
    assert sm.ledoit_wolf_shrinkage(Q) == pytest.approx(lw.shrinkage_, rel=1e-10, abs=1e-14)
    assert sm.ledoit_wolf_shrinkage(Q) == pytest.approx(sk_lw_shrinkage(Qf), rel=1e-10, abs=1e-14)
    expected = float(np.sqrt(lw.mahalanobis(Pf)).mean())
    assert sm.mahalanobis_distance(P, Q, covariance="ledoit_wolf") == pytest.approx(expected, rel=1e-8)
    P2, Q2 = sm.as_pair(P, Q)
    for path in ("gram", "explicit"):
        got = float(sm.mahalanobis_sq(P2, Q2, "ledoit_wolf", path=path).sqrt().mean())
        assert got == pytest.approx(expected, rel=1e-8), path


def test_ledoit_wolf_single_feature_has_no_shrinkage_like_sklearn():
    Q = torch.tensor([[1.0], [2.0], [4.0], [7.0]])
    P = torch.tensor([[0.0], [3.0]])
    lw = LedoitWolf().fit(_flat(Q))
    assert sm.ledoit_wolf_shrinkage(Q) == 0.0 == lw.shrinkage_
    expected = float(np.sqrt(lw.mahalanobis(_flat(P))).mean())
    assert sm.mahalanobis_distance(P, Q, covariance="ledoit_wolf") == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- KL


def test_kl_hand_worked_two_by_two():
    # P rows orthonormal: S_P = I -> softmax rows [e, 1]/(e + 1); Q rows identical: S_Q = 1 -> [1/2, 1/2]
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    Q = torch.tensor([[2.0, 0.0], [5.0, 0.0]])
    a, b = math.e / (math.e + 1), 1 / (math.e + 1)
    expected = a * math.log(2 * a) + b * math.log(2 * b)  # same for both rows
    assert expected == pytest.approx(0.1109441, abs=1e-7)
    assert sm.kl_divergence(P, Q) == pytest.approx(expected, abs=1e-7)


def test_kl_matches_scipy_rel_entr_with_temperature():
    P, Q = _sets(n=11, m=11, seed=10)
    for tau in (1.0, 0.07):
        probs = []
        for X in (_flat(P), _flat(Q)):
            Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
            S = Xn @ Xn.T / tau
            E = np.exp(S - S.max(axis=1, keepdims=True))
            probs.append(E / E.sum(axis=1, keepdims=True) + 1e-8)
        expected = rel_entr(*probs).sum(axis=1).mean()
        assert sm.kl_divergence(P, Q, tau=tau) == pytest.approx(expected, rel=1e-10)
    assert sm.kl_divergence(P, P) == 0.0
    assert sm.kl_divergence(P, Q) > 0


# ----------------------------------------------------------------------------- dicts, references


def test_shift_and_intra_distance_dicts():
    P, Q = _sets(n=10, m=10, seed=11)
    d = sm.shift_distances(P, Q)
    assert d == {
        "l2": sm.l2_distance(P, Q),
        "hausdorff": sm.hausdorff_distance(P, Q),
        "mahalanobis": sm.mahalanobis_distance(P, Q),
        "kl": sm.kl_divergence(P, Q),
    }
    assert sm.shift_distances(P, Q, covariance="ledoit_wolf", tau=0.5)["kl"] == sm.kl_divergence(P, Q, 0.5)
    assert sm.intra_distances(P) == {
        "l2": sm.intra_l2(P),
        "hausdorff": sm.intra_hausdorff(P),
        "mahalanobis": sm.intra_mahalanobis(P),
    }


def test_loop_references_agree_with_the_vectorized_metrics():
    P, Q = _sets(n=8, m=8, shape=(3, 4), seed=12)
    assert ref.reference_l2_distance(P, Q) == pytest.approx(sm.l2_distance(P, Q), rel=1e-10)
    assert ref.reference_intra_l2(P) == pytest.approx(sm.intra_l2(P), rel=1e-10)
    assert ref.reference_hausdorff_distance(P, Q) == pytest.approx(sm.hausdorff_distance(P, Q), rel=1e-10)
    assert ref.reference_intra_hausdorff(P) == pytest.approx(sm.intra_hausdorff(P), rel=1e-10)
    assert ref.reference_kl_divergence(P, Q, 0.3) == pytest.approx(sm.kl_divergence(P, Q, 0.3), rel=1e-9)
    P2, Q2 = _sets(n=8, m=40, shape=(6,), seed=13)
    for cov in ("pinv", "ledoit_wolf"):
        assert ref.reference_mahalanobis_distance(P2, Q2, cov) == pytest.approx(
            sm.mahalanobis_distance(P2, Q2, cov), rel=1e-9
        )


# ----------------------------------------------------------------------------- errors


def test_different_feature_shapes_are_rejected_with_a_fix():
    P = torch.randn(4, 77, 768)
    with pytest.raises(ValueError, match=r"different per-sample shapes.*\(77, 768\).*\(768,\).*same way"):
        sm.l2_distance(P, torch.randn(4, 768))
    with pytest.raises(ValueError, match="different per-sample shapes"):
        sm.mahalanobis_distance(torch.randn(3, 5), torch.randn(6, 4))


@pytest.mark.parametrize(
    "fn",
    [sm.l2_distance, sm.hausdorff_distance, sm.mahalanobis_distance, sm.kl_divergence, sm.shift_distances],
)
def test_empty_and_non_finite_sets_are_rejected(fn):
    good = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"P is empty \(0 samples\)"):
        fn(torch.empty(0, 4), good)
    with pytest.raises(ValueError, match=r"Q is empty"):
        fn(good, torch.empty(0, 4))
    bad = good.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"P contains NaN or inf.*rows \[2\]"):
        fn(bad, good)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"Q contains NaN or inf"):
        fn(good, bad)


def test_other_bad_inputs_name_the_problem():
    good = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"at least 2 samples in Q"):
        sm.mahalanobis_distance(good, good[:1])
    for f in (sm.intra_l2, sm.intra_hausdorff, sm.intra_mahalanobis):
        with pytest.raises(ValueError, match=r"P has 1 sample\(s\); this metric needs at least 2"):
            f(good[:1])
    with pytest.raises(ValueError, match=r"shaped \[N, \.\.\.\].*x\[None\]"):
        sm.l2_distance(torch.randn(4), good)
    with pytest.raises(ValueError, match="torch.Tensor or numpy array"):
        sm.l2_distance([[1.0, 2.0]], good)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"tau must be a finite number > 0"):
            sm.kl_divergence(good, good, tau=tau)
    with pytest.raises(ValueError, match=r"same number of prompts.*5 and 4"):
        sm.kl_divergence(good, good[:4])
    zero = good.clone()
    zero[3] = 0
    with pytest.raises(ValueError, match=r"zero-norm rows \[3\]"):
        sm.kl_divergence(zero, good)
    with pytest.raises(ValueError, match=r"covariance must be 'pinv' or 'ledoit_wolf'"):
        sm.mahalanobis_distance(good, good, covariance="inverse")
    with pytest.raises(ValueError, match=r"rtol must be"):
        sm.mahalanobis_distance(good, good, rtol=-1.0)
    with pytest.raises(ValueError, match=r"all samples of Q are identical"):
        sm.mahalanobis_distance(good, torch.ones(5, 4))


def test_shift_distances_rejects_unpaired_sets_before_computing():
    with pytest.raises(ValueError, match=r"same number of prompts"):
        sm.shift_distances(torch.randn(5, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"tau must be"):
        sm.shift_distances(torch.randn(5, 4), torch.randn(5, 4), tau=0)

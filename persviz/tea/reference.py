"""Loop reference versions of the semantic-shift metrics, the way the public TEA code computes them.

Plain numpy with Python loops over samples; for benchmarking ``persviz.tea.shift`` and as a
readable statement of each formula. The Mahalanobis reference forms the F x F covariance
explicitly, so keep F small (a few thousand at most).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _np(X: torch.Tensor | np.ndarray) -> np.ndarray:
    """A set as a float64 numpy array [N, F]."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    return X.reshape(X.shape[0], -1)


def reference_l2_distance(P: torch.Tensor | np.ndarray, Q: torch.Tensor | np.ndarray) -> float:
    """Mean |p - q| over all pairs, by a double loop."""
    P, Q = _np(P), _np(Q)
    total = 0.0
    for p in P:
        for q in Q:
            total += float(np.linalg.norm(p - q))
    return total / (len(P) * len(Q))


def reference_intra_l2(P: torch.Tensor | np.ndarray) -> float:
    """Mean |x_i - x_j| over pairs i != j, by a double loop."""
    P = _np(P)
    total, count = 0.0, 0
    for i in range(len(P)):
        for j in range(len(P)):
            if i != j:
                total += float(np.linalg.norm(P[i] - P[j]))
                count += 1
    return total / count


def _directed(A: np.ndarray, B: np.ndarray) -> float:
    """max over a of min over b of |a - b|."""
    worst = 0.0
    for a in A:
        best = math.inf
        for b in B:
            best = min(best, float(np.linalg.norm(a - b)))
        worst = max(worst, best)
    return worst


def reference_hausdorff_distance(P: torch.Tensor | np.ndarray, Q: torch.Tensor | np.ndarray) -> float:
    """max(max_p min_q d, max_q min_p d), by loops."""
    P, Q = _np(P), _np(Q)
    return max(_directed(P, Q), _directed(Q, P))


def reference_intra_hausdorff(P: torch.Tensor | np.ndarray) -> float:
    """max_i min_{j != i} |x_i - x_j|, by loops."""
    P = _np(P)
    worst = 0.0
    for i in range(len(P)):
        best = math.inf
        for j in range(len(P)):
            if i != j:
                best = min(best, float(np.linalg.norm(P[i] - P[j])))
        worst = max(worst, best)
    return worst


def reference_mahalanobis_distance(
    P: torch.Tensor | np.ndarray, Q: torch.Tensor | np.ndarray, covariance: str = "pinv"
) -> float:
    """Mean over x in P of sqrt((x - mu_Q)^T S^-1 (x - mu_Q)) with an explicit F x F S.

    "pinv": numpy.linalg.pinv(numpy.cov(Q)) with the cut-off max(N, F) * eps relative to the largest eigenvalue
    (numpy's own default, 1e-15, inverts round-off eigenvalues of a rank-deficient covariance once F > N and gives
    numbers that depend on the BLAS); "ledoit_wolf": sklearn LedoitWolf precision.
    """
    P, Q = _np(P), _np(Q)
    mu = Q.mean(axis=0)
    if covariance == "pinv":
        cov = np.cov(Q, rowvar=False).reshape(Q.shape[1], Q.shape[1])
        inv = np.linalg.pinv(cov, rcond=max(Q.shape) * np.finfo(np.float64).eps, hermitian=True)
    elif covariance == "ledoit_wolf":
        from sklearn.covariance import LedoitWolf  # heavy: scikit-learn, for this option only

        inv = LedoitWolf().fit(Q).precision_
    else:
        raise ValueError(f"covariance must be 'pinv' or 'ledoit_wolf'; got {covariance!r}")
    total = 0.0
    for x in P:
        d = x - mu
        total += math.sqrt(max(float(d @ inv @ d), 0.0))
    return total / len(P)


def reference_kl_divergence(P: torch.Tensor | np.ndarray, Q: torch.Tensor | np.ndarray, tau: float = 1.0) -> float:
    """mean_i sum_j p_ij log(p_ij / q_ij) of row-softmaxed cosine similarities (+1e-8), by loops."""
    P, Q = _np(P), _np(Q)

    def rows(X: np.ndarray) -> list[list[float]]:
        Xn = [x / np.linalg.norm(x) for x in X]
        out = []
        for a in Xn:
            sims = [float(a @ b) / tau for b in Xn]
            top = max(sims)
            exps = [math.exp(s - top) for s in sims]
            z = sum(exps)
            out.append([e / z + 1e-8 for e in exps])
        return out

    p, q = rows(P), rows(Q)
    total = 0.0
    for pi, qi in zip(p, q):
        total += sum(a * math.log(a / b) for a, b in zip(pi, qi))
    return total / len(p)

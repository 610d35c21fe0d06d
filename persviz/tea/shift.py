"""Semantic-shift metrics between sets of prompt embeddings (TEA, Sec. 3.2.1 and App. E.2).

Every function takes sets shaped [N, ...] (e.g. [N, 77, 768] text-encoder hidden states or
[N, D] pooled embeddings), flattens everything after the first dimension, computes in float64
on the input's device and returns a Python float. Loop versions for benchmarking live in
``persviz.tea.reference``.
"""
from __future__ import annotations

import math
import numbers
from typing import Literal

import numpy as np
import torch

Covariance = Literal["pinv", "ledoit_wolf"]
SetLike = torch.Tensor | np.ndarray

_PATHS = ("auto", "explicit", "gram")


def _as_set(X: SetLike, name: str, min_samples: int = 1) -> torch.Tensor:
    """Validate one set and return it flattened to [N, F] float64."""
    if not isinstance(X, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array shaped [N, ...]; got {type(X).__name__}")
    T = torch.as_tensor(X)
    if T.is_complex():
        raise ValueError(f"{name} is complex ({T.dtype}); pass real-valued embeddings")
    if T.ndim < 2:
        raise ValueError(
            f"{name} must be a set shaped [N, ...] (N samples first); got shape {tuple(T.shape)}. "
            f"For a single embedding pass x[None]."
        )
    if T.shape[0] < min_samples:
        what = "is empty (0 samples)" if T.shape[0] == 0 else f"has {T.shape[0]} sample(s)"
        raise ValueError(f"{name} {what}; this metric needs at least {min_samples}. Pass more prompt embeddings.")
    T = T.detach().reshape(T.shape[0], -1).to(torch.float64)
    if T.shape[1] == 0:
        raise ValueError(f"{name} has no features per sample (shape {tuple(X.shape)}); pass non-empty embeddings")
    bad = ~torch.isfinite(T)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(
            f"{name} contains NaN or inf ({int(bad.sum())} values, in rows {rows}...); "
            f"check the text-encoder outputs (e.g. fp16 overflow) and drop or recompute those rows."
        )
    return T


def as_pair(P: SetLike, Q: SetLike, min_p: int = 1, min_q: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two sets with the same per-sample shape; both [N, F] float64 on P's device."""
    P2, Q2 = _as_set(P, "P", min_p), _as_set(Q, "Q", min_q)
    sp, sq = tuple(P.shape[1:]), tuple(Q.shape[1:])
    if sp != sq:
        raise ValueError(
            f"P and Q have different per-sample shapes: P {sp} ({P2.shape[1]} features) vs Q {sq} "
            f"({Q2.shape[1]} features). Embed both sets the same way (same text encoder; both full hidden "
            f"states or both pooled)."
        )
    return P2, Q2.to(P2.device)


def _sq_dists(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, M] in float64, computed after a common centring for accuracy."""
    c = torch.cat([A, B]).mean(dim=0)
    A, B = A - c, B - c
    d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return d2.clamp_min_(0.0)


def pairwise_distances(P: SetLike, Q: SetLike) -> torch.Tensor:
    """All Euclidean distances |p_i - q_j| as a float64 tensor [N, M]."""
    P2, Q2 = as_pair(P, Q)
    return _sq_dists(P2, Q2).sqrt()


def l2_distance(P: SetLike, Q: SetLike) -> float:
    """Inter-set L2: mean over all pairs (p, q) of |p - q|."""
    P2, Q2 = as_pair(P, Q)
    return _l2(_sq_dists(P2, Q2))


def _l2(d2: torch.Tensor) -> float:
    """Mean distance from squared distances."""
    return float(d2.sqrt().mean())


def intra_l2(P: SetLike) -> float:
    """Intra-set L2: mean of |x_i - x_j| over ordered pairs i != j (needs N >= 2)."""
    P2 = _as_set(P, "P", 2)
    return _intra_l2(_sq_dists(P2, P2))


def _intra_l2(d2: torch.Tensor) -> float:
    """Mean off-diagonal distance from a square matrix of squared distances."""
    n = d2.shape[0]
    return float(d2.sqrt().fill_diagonal_(0.0).sum() / (n * (n - 1)))


def hausdorff_distance(P: SetLike, Q: SetLike) -> float:
    """Symmetric Hausdorff distance: max(max_p min_q d(p, q), max_q min_p d(p, q))."""
    P2, Q2 = as_pair(P, Q)
    return _hausdorff(P2, Q2, _sq_dists(P2, Q2))


def _hausdorff(P2: torch.Tensor, Q2: torch.Tensor, d2: torch.Tensor) -> float:
    """Hausdorff from squared distances; nearest pairs found on d2, then measured exactly."""
    to_q = (P2 - Q2[d2.argmin(dim=1)]).norm(dim=1)
    to_p = (Q2 - P2[d2.argmin(dim=0)]).norm(dim=1)
    return float(torch.maximum(to_q.max(), to_p.max()))


def intra_hausdorff(P: SetLike) -> float:
    """Intra-set Hausdorff: max_i min_{j != i} |x_i - x_j| (needs N >= 2)."""
    P2 = _as_set(P, "P", 2)
    return _intra_hausdorff(P2, _sq_dists(P2, P2))


def _intra_hausdorff(P2: torch.Tensor, d2: torch.Tensor) -> float:
    """Largest nearest-neighbour distance; neighbours found on d2, then measured exactly."""
    d2 = d2.clone().fill_diagonal_(math.inf)
    return float((P2 - P2[d2.argmin(dim=1)]).norm(dim=1).max())


def _eigh_desc(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues clamped at 0, in descending order."""
    w, U = torch.linalg.eigh(A)
    return w.flip(0).clamp_min(0.0), U.flip(1)


def ledoit_wolf_shrinkage(Q: SetLike) -> float:
    """Ledoit-Wolf shrinkage coefficient of Cov(Q), equal to sklearn.covariance.ledoit_wolf_shrinkage."""
    Q2 = _as_set(Q, "Q", 2)
    Xc = Q2 - Q2.mean(dim=0)
    n, p = Xc.shape
    A = Xc.T @ Xc if p <= n else Xc @ Xc.T
    return _lw_shrinkage(Xc, A)


def _lw_shrinkage(Xc: torch.Tensor, A: torch.Tensor) -> float:
    """Shrinkage from centred data and its scatter (X^T X) or Gram (X X^T) matrix; both share ||.||_F."""
    n, p = Xc.shape
    if p == 1:
        return 0.0
    row_sq = (Xc * Xc).sum(dim=1)  # |x_i|^2
    trace = float(row_sq.sum()) / n  # trace of the empirical covariance (1/n)
    mu = trace / p
    delta_ = float((A * A).sum()) / n**2  # |X^T X|_F^2 / n^2 = |X X^T|_F^2 / n^2
    beta_ = float((row_sq * row_sq).sum())  # sum of the entries of (X^2)^T X^2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def mahalanobis_sq(
    P2: torch.Tensor,
    Q2: torch.Tensor,
    covariance: Covariance = "pinv",
    rtol: float | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """Squared Mahalanobis distances [N] of P's rows to Q; path "explicit" (F x F) or "gram" (M x M)."""
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}; got {path!r}")
    n, p = Q2.shape
    mu_q = Q2.mean(dim=0)
    Xc, Y = Q2 - mu_q, P2 - mu_q
    explicit = p <= n if path == "auto" else path == "explicit"
    if rtol is None:
        rtol = max(n, p) * torch.finfo(torch.float64).eps
    # Spectrum of the scatter matrix X^T X: eigenvalues w_k and coordinates a = y . v_k.
    if explicit:
        A = Xc.T @ Xc
        w, V = _eigh_desc(A)
        a = Y @ V
    else:  # the Gram matrix X X^T has the same non-zero spectrum; v_k = X^T u_k / sqrt(w_k)
        A = Xc @ Xc.T
        w, U = _eigh_desc(A)
    if float(w[0]) == 0.0:
        raise ValueError("all samples of Q are identical (zero covariance); the Mahalanobis distance is undefined")
    keep = w > rtol * w[0]
    if not explicit:
        w, U = w[keep], U[:, keep]
        a = (Y @ Xc.T) @ U / w.sqrt()
        keep = torch.ones_like(w, dtype=torch.bool)
    if covariance == "pinv":
        return (a[:, keep] ** 2 / (w[keep] / (n - 1))).sum(dim=1)
    # Ledoit-Wolf: (1 - s) * emp_cov + s * mu * I, emp_cov = X^T X / n; eigenvalue s * mu off span(Q).
    s = _lw_shrinkage(Xc, A)
    floor = s * float((Xc * Xc).sum()) / (n * p)  # s * trace(emp_cov) / F
    lam = (1.0 - s) * (w / n) + floor
    rank_deficient = (not explicit) or bool((w <= rtol * w[0]).any())
    if floor <= 0.0 and rank_deficient:
        raise ValueError(
            "the Ledoit-Wolf estimate of Cov(Q) is singular (shrinkage 0 and Q rank-deficient); "
            "use covariance='pinv' or more samples in Q"
        )
    a2 = a * a
    d2 = (a2 / lam).sum(dim=1)
    if not explicit:
        outside = ((Y * Y).sum(dim=1) - a2.sum(dim=1)).clamp_min(0.0)  # |y|^2 off span(Q)
        d2 = d2 + outside / floor
    return d2


def _check_covariance(covariance: str) -> None:
    """Raise unless covariance names a supported estimate."""
    if covariance not in ("pinv", "ledoit_wolf"):
        raise ValueError(f"covariance must be 'pinv' or 'ledoit_wolf'; got {covariance!r}")


def _check_rtol(rtol: float | None) -> None:
    """Raise unless rtol is None or a finite number in [0, 1)."""
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, numbers.Real)
                             or not (math.isfinite(rtol) and 0.0 <= rtol < 1.0)):
        raise ValueError(f"rtol must be None or a finite number in [0, 1); got {rtol!r}")


def mahalanobis_distance(
    P: SetLike, Q: SetLike, covariance: Covariance = "pinv", rtol: float | None = None
) -> float:
    """Mean over x in P of sqrt((x - mu_Q)^T S^-1 (x - mu_Q)), S = Cov(Q).

    Args:
        covariance: "pinv" (public TEA code): pseudo-inverse of the unbiased Cov(Q) (1/(M-1), as numpy.cov);
            "ledoit_wolf": sklearn.covariance.LedoitWolf's shrunk estimate (1/M empirical covariance).
            With M <= F the pseudo-inverse ignores every component of x - mu_Q outside span(Q);
            Ledoit-Wolf weighs it by 1 / (shrinkage * mean variance).
        rtol: pinv cutoff: covariance eigenvalues below rtol * largest count as zero
            (default max(M, F) * float64 eps). Computed through the M x M Gram matrix when F > M.
    """
    _check_covariance(covariance)
    _check_rtol(rtol)
    P2, Q2 = as_pair(P, Q)
    if Q2.shape[0] < 2:
        raise ValueError("Cov(Q) needs at least 2 samples in Q; got 1. Pass more prompt embeddings for Q.")
    return float(mahalanobis_sq(P2, Q2, covariance, rtol).sqrt().mean())


def intra_mahalanobis(P: SetLike, covariance: Covariance = "ledoit_wolf", rtol: float | None = None) -> float:
    """Mean Mahalanobis distance of P's own samples to P.

    With covariance="pinv" and N - 1 <= F it is the constant (N - 1) / sqrt(N) for any P in general
    position, so the Ledoit-Wolf estimate is the default here.
    """
    _check_covariance(covariance)
    _check_rtol(rtol)
    P2 = _as_set(P, "P", 2)
    return float(mahalanobis_sq(P2, P2, covariance, rtol).sqrt().mean())


def kl_divergence(P: SetLike, Q: SetLike, tau: float = 1.0) -> float:
    """KL between the row-softmaxed cosine-similarity matrices of P and Q (rows paired: P[i] and Q[i]).

    L2-normalise rows, S = X X^T / tau, softmax each row, add 1e-8 (no renormalisation, as in
    the paper's code), KL = mean_i sum_j p_ij log(p_ij / q_ij).
    """
    check_tau(tau)
    P2, Q2 = as_pair(P, Q)
    return _kl(P2, Q2, float(tau))


def check_tau(tau: float) -> None:
    """Raise unless tau is a finite number > 0."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0 (softmax temperature, default 1.0); got {tau!r}")


def _check_paired(P2: torch.Tensor, Q2: torch.Tensor) -> None:
    """Raise unless the two sets have the same number of rows (KL pairs row i with row i)."""
    if P2.shape[0] != Q2.shape[0]:
        raise ValueError(
            f"KL needs P and Q with the same number of prompts (row i of each is the same prompt); "
            f"got {P2.shape[0]} and {Q2.shape[0]}. Embed the same prompt list for both sets."
        )


def _kl(P2: torch.Tensor, Q2: torch.Tensor, tau: float) -> float:
    """KL of the row-softmaxed similarity matrices of two validated sets."""
    _check_paired(P2, Q2)
    probs = []
    for name, X in (("P", P2), ("Q", Q2)):
        norms = X.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            rows = torch.nonzero(norms.flatten() == 0).flatten()[:5].tolist()
            raise ValueError(f"{name} has zero-norm rows {rows}; they cannot be L2-normalised")
        Xn = X / norms
        probs.append(torch.softmax(Xn @ Xn.T / tau, dim=1) + 1e-8)
    p, q = probs
    return float((p * (p.log() - q.log())).sum(dim=1).mean())


def shift_distances(
    P: SetLike, Q: SetLike, covariance: Covariance = "pinv", tau: float = 1.0
) -> dict[str, float]:
    """All four inter-set metrics d(P, Q): keys "l2", "hausdorff", "mahalanobis", "kl" (validated once)."""
    _check_covariance(covariance)
    check_tau(tau)
    P2, Q2 = as_pair(P, Q)
    if Q2.shape[0] < 2:
        raise ValueError("Cov(Q) needs at least 2 samples in Q; got 1. Pass more prompt embeddings for Q.")
    _check_paired(P2, Q2)
    d2 = _sq_dists(P2, Q2)
    return {
        "l2": _l2(d2),
        "hausdorff": _hausdorff(P2, Q2, d2),
        "mahalanobis": float(mahalanobis_sq(P2, Q2, covariance).sqrt().mean()),
        "kl": _kl(P2, Q2, float(tau)),
    }


def intra_distances(P: SetLike, covariance: Covariance = "ledoit_wolf") -> dict[str, float]:
    """Intra-set metrics of one set: keys "l2", "hausdorff", "mahalanobis" (KL of a set with itself is 0)."""
    _check_covariance(covariance)
    P2 = _as_set(P, "P", 2)
    d2 = _sq_dists(P2, P2)
    return {
        "l2": _intra_l2(d2),
        "hausdorff": _intra_hausdorff(P2, d2),
        "mahalanobis": float(mahalanobis_sq(P2, P2, covariance).sqrt().mean()),
    }

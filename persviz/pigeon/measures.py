"""What a history mask keeps, against per-token ground truth (token-level noise, ``users`` regime "token").

Pure functions of tensors (or arrays) shaped [..., n]: the last axis holds the n tokens of one image, every
leading axis indexes images (e.g. [B, H, n]: B windows of H history images). ``noise`` is True for a
distractor token (``PigeonDataset`` item ``"history_distractor_tokens"``), ``keep`` is a keep-mask
(1 = kept), ``scores`` the mask generator's token scores (higher = more likely kept).

- ``kept_noise_share``: the share of kept tokens that are distractor tokens;
- ``perfect_keep_mask`` / ``perfect_kept_noise_share``: a mask that keeps as many tokens per image as Pigeon's
  (``k = max(1, int(n * (1 - ratio)))``) and drops exactly the distractor tokens first: the best any such mask
  can do (above 0 when an image has more distractor tokens than the mask drops);
- ``truth_keep_mask``: the ground truth itself, keeping every taste token and no distractor token (any number per
  image): the mask a stage-1 model is trained and read with in the perfect-mask control (``PigeonModel`` history
  mode "truth");
- ``chance_kept_noise_share``: the expected share of a mask keeping k tokens of each image at random (the share
  of distractor tokens);
- ``token_auc``: the probability that a taste (non-distractor) token scores above a distractor token (ties count
  one half), within each image (what a per-image top-k acts on), each window, or pooled; 0.5 is chance.

Usage::

    keep = study.history_keep_mask(pipe, study.token_scores(pipe, history, reference))
    kept_noise_share(keep, noise), perfect_kept_noise_share(noise, 0.2), chance_kept_noise_share(noise)
"""
from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import rankdata


Per = Literal["image", "window", "all"]


def _bool(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.ndim < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} must be [..., n] with n >= 1 tokens per image; got shape {tuple(t.shape)}")
    return t.bool() if t.dtype == torch.bool else t.ne(0)


def _pair(keep: Any, noise: Any) -> tuple[torch.Tensor, torch.Tensor]:
    k, m = _bool(keep, "keep"), _bool(noise, "noise")
    if tuple(k.shape) != tuple(m.shape):
        raise ValueError(f"keep {tuple(k.shape)} and noise {tuple(m.shape)} must have the same shape [..., n]")
    return k, m


def keep_count(n: int, ratio: float) -> int:
    """Tokens a per-image top-k keeps at mask ratio ``ratio``: ``max(1, int(n * (1 - ratio)))`` (Eq. 3)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio={ratio!r} must be a mask ratio in [0, 1] (the fraction of each image's tokens "
                         f"MASKED; Pigeon's history mask: 0.2)")
    return max(1, int(n * (1.0 - float(ratio))))


def kept_noise_share(keep: Any, noise: Any) -> float:
    """Share of kept tokens that are distractor tokens, pooled over all images; NaN when nothing is kept."""
    k, m = _pair(keep, noise)
    total = int(k.sum())
    return float((k & m).sum()) / total if total else float("nan")


def perfect_keep_mask(noise: Any, ratio: float) -> torch.Tensor:
    """The keep-mask [..., n] that keeps ``keep_count(n, ratio)`` tokens per image, dropping distractor tokens
    first (taste tokens kept first; within a kind, the lower token index first)."""
    m = _bool(noise, "noise")
    n = m.shape[-1]
    k = keep_count(n, ratio)
    order = torch.argsort(m.long() * n + torch.arange(n), dim=-1, stable=True)  # taste tokens, then distractors
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand_as(order))
    return ranks < k


def truth_keep_mask(noise: Any) -> torch.Tensor:
    """The ground truth's keep-mask [..., n]: every taste token kept, every distractor token dropped (the number
    kept varies per image; ``perfect_keep_mask`` keeps Pigeon's fixed number instead). Its kept-noise share is 0."""
    return ~_bool(noise, "noise")


def perfect_kept_noise_share(noise: Any, ratio: float) -> float:
    """``kept_noise_share`` of ``perfect_keep_mask``: per image max(0, d - (n - k)) of its k kept tokens are
    distractors (d distractor tokens, n - k dropped)."""
    return kept_noise_share(perfect_keep_mask(noise, ratio), noise)


def chance_kept_noise_share(noise: Any) -> float:
    """Expected ``kept_noise_share`` of a mask that keeps the same number of tokens of every image at random:
    each image's share d / n, averaged over images (= the share of distractor tokens)."""
    return float(_bool(noise, "noise").float().mean())


def _auc(scores: np.ndarray, noise: np.ndarray) -> float:
    """P(taste score > distractor score) + P(tie) / 2 of one group (Mann-Whitney on average ranks); NaN without
    both kinds."""
    n_noise = int(noise.sum())
    n_taste = noise.size - n_noise
    if n_noise == 0 or n_taste == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[~noise].sum() - n_taste * (n_taste + 1) / 2) / (n_taste * n_noise))


def token_aucs(scores: Any, noise: Any, per: Per = "image") -> np.ndarray:
    """``token_auc`` of every group: per "image" [...], per "window" (the last two axes together) [...] or "all"
    [1]; NaN for a group without both kinds of token."""
    m = _bool(noise, "noise")
    s = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).detach().cpu()
    if tuple(s.shape) != tuple(m.shape):
        raise ValueError(f"scores {tuple(s.shape)} and noise {tuple(m.shape)} must have the same shape [..., n]")
    if not bool(torch.isfinite(s.double()).all()):
        raise ValueError("scores contain NaN or inf")
    if per not in ("image", "window", "all"):
        raise ValueError(f"per={per!r}; use 'image' (within each image), 'window' (each history) or 'all'")
    s_np, m_np = s.double().numpy(), m.numpy()
    if per == "all":
        return np.array([_auc(s_np.reshape(-1), m_np.reshape(-1))])
    if per == "window":
        if s_np.ndim < 2:
            raise ValueError(f"per='window' needs [..., H, n] scores; got shape {tuple(s.shape)}")
        lead = s_np.shape[:-2]
        s_np, m_np = s_np.reshape(*lead, -1), m_np.reshape(*lead, -1)
    lead = s_np.shape[:-1]
    flat_s, flat_m = s_np.reshape(-1, s_np.shape[-1]), m_np.reshape(-1, m_np.shape[-1])
    return np.array([_auc(a, b) for a, b in zip(flat_s, flat_m)]).reshape(lead)


def token_auc(scores: Any, noise: Any, per: Per = "image") -> float:
    """P(a taste token scores above a distractor token), ties one half: the mean over the groups ``per`` "image"
    (default), "window" (each history's tokens together) or "all" (one pooled AUC) that hold both kinds; NaN when
    none does."""
    v = token_aucs(scores, noise, per)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def window_measures(keep: Any, scores: Any, noise: Any, ratio: float) -> dict[str, list[float]]:
    """Per window (the first axis of [B, H, n]): "kept_noise_share" of ``keep``, "perfect" and "chance" shares
    at ``ratio``, "score_auc" (mean of the per-image AUCs; NaN without an image holding both kinds) and
    "noise_rate" (share of distractor tokens)."""
    k, m = _pair(keep, noise)
    if k.ndim != 3:
        raise ValueError(f"keep, scores and noise must be [B, H, n] (windows, history images, tokens); got "
                         f"{tuple(k.shape)}")
    perfect = perfect_keep_mask(m, ratio)
    aucs = token_aucs(scores, m, "image")
    out: dict[str, list[float]] = {"kept_noise_share": [], "perfect": [], "chance": [], "score_auc": [],
                                   "noise_rate": []}
    for i in range(k.shape[0]):
        out["kept_noise_share"].append(kept_noise_share(k[i], m[i]))
        out["perfect"].append(kept_noise_share(perfect[i], m[i]))
        out["chance"].append(chance_kept_noise_share(m[i]))
        a = aucs[i][np.isfinite(aucs[i])]
        out["score_auc"].append(float(a.mean()) if a.size else math.nan)
        out["noise_rate"].append(float(m[i].float().mean()))
    return out


__all__ = ["chance_kept_noise_share", "keep_count", "kept_noise_share", "perfect_keep_mask",
           "perfect_kept_noise_share", "token_auc", "token_aucs", "truth_keep_mask", "window_measures"]

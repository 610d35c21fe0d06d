"""FineXL core math: explain how a personalized generator differs from its base model.

FineXL (Wang & Gao) measures the divergence between a personalized and a base image
generator as one image-embedding direction ``V_div`` and decomposes it into text
directions ``f(C)`` of low-level concepts ``C`` ("watercolor", "warm palette"):
``V_div ~= sum_i w_i f(C_i)``, reported as one sentence per concept.

Pipeline::

    v_div, spread = divergence_vector(emb_personal, emb_base)
    f = {c: concept_direction(encoder.embed_texts, probes, c) for c in candidates}
    order = orthogonal_filter(v_div, f, eps_ortho=0.1)   # positive_only=True with a non-negative solver
    dec, trace = greedy_decompose(v_div, f, order=order, method="whitened_nnls")
    sentences = explain(dec)

Conventions: every function takes ``torch.Tensor`` (NumPy arrays also work), computes
in float64 and returns float64 CPU tensors. ``f(C)`` is *not* re-normalised (as in the
paper), so a weight ``w = 1`` means the personalization moves images as far along C as
appending ", C" to a prompt moves its text embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import nnls

Method = Literal["lstsq", "whitened_nnls"]
METHODS: tuple[str, ...] = ("lstsq", "whitened_nnls")

#: |v_div| below this means the two generators look identical to the encoder.
MIN_DIVERGENCE_NORM = 1e-6
#: Level-word thresholds on |w| (applied to the weight rounded to 2 decimals), see `explain`.
LEVEL_THRESHOLDS: tuple[tuple[float, str], ...] = ((0.5, "much "), (0.2, ""), (0.05, "slightly "))


@dataclass(frozen=True)
class Decomposition:
    """Result of ``v_div ~= sum_i weights[i] * f(names[i])``.

    Attributes:
        names: concept names, in the order they were given (the filter's order).
        weights: float64 tensor [K], one weight per name.
        residual: float64 tensor [D], ``v_div - sum_i w_i f(C_i)`` in the original space.
        relative_residual: ``e = |residual| / |v_div|`` (0 = fully explained, 1 = nothing).
        method: "lstsq" or "whitened_nnls".
        e_decomp: the residual bound the decomposition is judged against.
    """

    names: list[str]
    weights: torch.Tensor
    residual: torch.Tensor = field(repr=False)
    relative_residual: float
    method: str
    e_decomp: float = 0.2

    @property
    def within_bound(self) -> bool:
        """True when ``relative_residual < e_decomp`` (the paper's stopping rule)."""
        return self.relative_residual < self.e_decomp

    def as_dict(self) -> dict[str, float]:
        """``{concept name: weight}``."""
        return {n: float(w) for n, w in zip(self.names, self.weights)}


# ----------------------------------------------------------------------------- validation


def _to_numpy(x: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """Float64 NumPy copy of a tensor/array; raises if it is not finite."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        arr = x.astype(np.float64)
    else:
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}.")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {tuple(arr.shape)}): pass at least one element.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or inf: check the encoder outputs (e.g. fp16 overflow, "
                         f"black or empty images) and drop or recompute the bad rows.")
    return arr


def _vector(x: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """A finite 1-D float64 vector."""
    arr = _to_numpy(x, what)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector [D], got shape {tuple(arr.shape)}: "
                         f"squeeze or average the batch dimension first.")
    return arr


def check_v_div(v_div: torch.Tensor | np.ndarray) -> np.ndarray:
    """v_div as a finite, non-zero 1-D float64 vector."""
    v = _vector(v_div, "v_div")
    if np.linalg.norm(v) < MIN_DIVERGENCE_NORM:
        raise ValueError(f"v_div has (near) zero norm ({np.linalg.norm(v):.2e}): the two generators look "
                         f"identical to the encoder, so there is nothing to explain. Check that the personalized "
                         f"weights (LoRA/adapter/fine-tune) are actually loaded and that the two sample sets "
                         f"are not the same images.")
    return v


def concept_matrix(concepts: dict[str, torch.Tensor], dim: int, what: str = "concepts") -> tuple[list[str], np.ndarray]:
    """Names and the [D, K] matrix whose columns are the concept vectors."""
    if not isinstance(concepts, dict):
        raise TypeError(f"{what} must be a dict {{name: vector [D]}}, got {type(concepts).__name__}.")
    if len(concepts) == 0:
        raise ValueError(f"{what} is empty: pass at least one concept {{name: f(C)}} "
                         f"(build them with concept_direction).")
    names, cols = [], []
    for name, vec in concepts.items():
        col = _vector(vec, f"concept vector {name!r}")
        if col.shape[0] != dim:
            raise ValueError(f"concept vector {name!r} has dimension {col.shape[0]} but v_div has {dim}: "
                             f"embed concepts and images with the same CLIP model (text and image towers).")
        names.append(str(name))
        cols.append(col)
    return names, np.stack(cols, axis=1)


def _check_e_decomp(e_decomp: float) -> float:
    """e_decomp as a float in (0, 1]."""
    e = float(e_decomp)
    if not (0.0 < e <= 1.0):
        raise ValueError(f"e_decomp must be in (0, 1] (a relative residual; the paper uses 0.2), got {e_decomp}.")
    return e


def _check_method(method: str) -> str:
    """method, if known."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(map(repr, METHODS))}.")
    return method


# ----------------------------------------------------------------------------- divergence


def divergence_vector(emb_personal: torch.Tensor, emb_base: torch.Tensor) -> tuple[torch.Tensor, float]:
    """V_div: mean difference of L2-normalised image embeddings of paired samples.

    Args:
        emb_personal: [N, D] image embeddings of the personalized model's samples.
        emb_base: [N, D] embeddings of the base model's samples; row n must share the
            prompt and seed of ``emb_personal[n]``.

    Returns:
        ``(v_div [D], spread)``. ``spread`` is the L2 norm of the per-dimension
        (population, ddof=0) standard deviation of the N paired differences, i.e. the
        root-mean-square distance of a single pair's difference from ``v_div``; the
        standard error of ``v_div`` is about ``spread / sqrt(N)``. 0.0 when N = 1.
    """
    p, b = _to_numpy(emb_personal, "emb_personal"), _to_numpy(emb_base, "emb_base")
    if p.shape != b.shape:
        raise ValueError(f"emb_personal {tuple(p.shape)} and emb_base {tuple(b.shape)} differ in shape: pass the "
                         f"same number of paired samples (same prompt and seed) embedded by the same encoder.")
    if p.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(p.shape)}.")
    for arr, what in ((p, "emb_personal"), (b, "emb_base")):
        norms = np.linalg.norm(arr, axis=1)
        if np.any(norms < 1e-12):
            raise ValueError(f"{what} has zero-norm rows {np.flatnonzero(norms < 1e-12).tolist()[:10]}: "
                             f"they cannot be L2-normalised; drop them (and their pairs) or re-embed.")
    diff = p / np.linalg.norm(p, axis=1, keepdims=True) - b / np.linalg.norm(b, axis=1, keepdims=True)
    v = diff.mean(axis=0)
    spread = float(np.linalg.norm(diff.std(axis=0)))
    return torch.from_numpy(check_v_div(v)), spread


def append_compose(prompt: str, concept: str) -> str:
    """The paper's f(C) prompt: ``f"{prompt}, {concept}"``."""
    return f"{prompt}, {concept}"


def concept_direction(text_encoder_fn: Callable[[list[str]], torch.Tensor], probe_prompts: Sequence[str],
                      concept: str, compose: Optional[Callable[[str, str], str]] = None) -> torch.Tensor:
    """f(C) = mean over probes t of normalise(E(compose(t, C))) - normalise(E(t)).

    Args:
        text_encoder_fn: any callable ``list[str] -> [N, D]`` text embeddings (called
            once with the N probes followed by the N composed prompts).
        probe_prompts: the probe prompts t (the paper uses about 20-25).
        concept: the concept text C, e.g. "watercolor".
        compose: ``(t, C) -> prompt`` with C added; default `append_compose` (the paper's
            ``t + ", " + C``). `persviz.finexl.concepts.shapesworld_compose` instead writes C
            into the caption's grammar (persviz's grammar-aware f(C)).

    Returns:
        float64 tensor [D]; not re-normalised.
    """
    if isinstance(probe_prompts, str) or len(probe_prompts) == 0:
        raise ValueError("probe_prompts must be a non-empty list of prompts (not a single string).")
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"concept must be a non-empty string, got {concept!r}.")
    probes = [str(t) for t in probe_prompts]
    n = len(probes)
    compose = append_compose if compose is None else compose
    if not callable(compose):
        raise TypeError(f"compose must be a callable (prompt, concept) -> prompt, got {type(compose).__name__}.")
    composed = [compose(t, concept) for t in probes]
    bad = [c for c in composed if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"compose returned {bad[0]!r} for concept {concept!r}: it must return a non-empty prompt.")
    emb = _to_numpy(text_encoder_fn(probes + composed), "text_encoder_fn output")
    if emb.ndim != 2 or emb.shape[0] != 2 * n:
        raise ValueError(f"text_encoder_fn must return [N, D] for N strings: got shape {tuple(emb.shape)} "
                         f"for {2 * n} strings.")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if np.any(norms < 1e-12):
        raise ValueError("text_encoder_fn returned zero-norm embeddings: they cannot be L2-normalised.")
    emb = emb / norms
    f = (emb[n:] - emb[:n]).mean(axis=0)
    if np.linalg.norm(f) < 1e-9:
        raise ValueError(f"adding {concept!r} did not move any probe prompt's embedding: check that the "
                         f"encoder does not truncate the prompts (CLIP keeps 77 tokens), that it reads text, and "
                         f"that compose changes at least one probe (a grammar-aware compose leaves probes that "
                         f"already say {concept!r} as they are).")
    return torch.from_numpy(f)


# ----------------------------------------------------------------------------- selection


def orthogonal_filter(v_div: torch.Tensor, candidates: dict[str, torch.Tensor], eps_ortho: float = 0.1,
                      min_relevance: float = 0.0, positive_only: bool = False) -> list[str]:
    """Greedy near-orthogonal subset of candidate concepts, most relevant first.

    Candidates are ordered by |cos(f(C), v_div)| (descending, ties keep dict order);
    C is kept only if ``|sum_j cos(f(C), f(C_j))| < eps_ortho`` over the already kept
    C_j (the signed sum, as in the paper). The paper uses ``eps_ortho = 0.03``; the
    public re-implementation needs 0.1-0.3 with CLIP, where every f(C) shares an
    "appended text" direction, so the default here is 0.1. Zero-norm candidates have no
    direction and are skipped. The most relevant usable candidate always survives the
    orthogonality test (nothing is kept yet), so the filter keeps at least one concept
    unless every candidate is rejected as zero-norm or as irrelevant (``min_relevance``).

    Args:
        v_div: [D] divergence vector.
        candidates: ``{name: f(C) [D]}``.
        eps_ortho: threshold in (0, inf).
        min_relevance: reject candidates with ``|cos(f(C), v_div)| < min_relevance`` before
            the orthogonality test (default 0: keep all, as in the paper).
        positive_only: consider only candidates with ``cos(f(C), v_div) > 0`` (for a
            non-negative solver: a concept pointing away from v_div can only get weight 0 there,
            yet ranked by |cos| it takes a slot and blocks its antonym, e.g. "small" blocks
            "large", whose direction is nearly its opposite). Default False (the paper's |cos|).

    Returns:
        Names of the kept concepts, in the order above (the order for `greedy_decompose`).

    Raises:
        ValueError: no candidate survives (all zero-norm, or all below ``min_relevance``).
    """
    v = check_v_div(v_div)
    names, mat = concept_matrix(candidates, v.shape[0], what="candidates")
    if not (float(eps_ortho) > 0.0):
        raise ValueError(f"eps_ortho must be > 0 (paper 0.03, re-implementation 0.1-0.3), got {eps_ortho}.")
    norms = np.linalg.norm(mat, axis=0)
    usable = norms > 1e-12
    unit = np.where(usable, mat / np.where(usable, norms, 1.0), 0.0)
    if not (0.0 <= float(min_relevance) <= 1.0):
        raise ValueError(f"min_relevance must be in [0, 1] (a |cosine|), got {min_relevance}.")
    signed = unit.T @ (v / np.linalg.norm(v))
    relevance = np.abs(signed)
    if positive_only:
        usable = usable & (signed > 0)
        if not np.any(usable):
            raise ValueError(f"no candidate concept survived: positive_only=True and none of {names} has "
                             f"cos(f(C), v_div) > 0 (every candidate points away from the personalization). "
                             f"Propose other concepts or use positive_only=False with a signed solver (lstsq).")
    order = sorted((i for i in range(len(names)) if usable[i]), key=lambda i: -relevance[i])
    if not order:
        raise ValueError(f"no candidate concept survived: all of {names} have zero-norm vectors. Recompute them "
                         f"with concept_direction (the encoder must react to the appended concept text).")
    relevant = [i for i in order if relevance[i] >= float(min_relevance)]
    if not relevant:
        raise ValueError(f"no candidate concept survived: all {len(order)} usable candidates have "
                         f"|cos(f(C), v_div)| < min_relevance = {float(min_relevance):g} (largest "
                         f"{relevance[order[0]]:.3f}, {names[order[0]]!r}): none of them describes the "
                         f"personalization. Propose other concepts (another VLM, a larger concept bank) or lower "
                         f"min_relevance.")
    kept: list[int] = []
    for i in relevant:
        if not kept or abs(float(np.sum(unit[:, kept].T @ unit[:, i]))) < eps_ortho:
            kept.append(i)
    return [names[i] for i in kept]


# ----------------------------------------------------------------------------- decomposition


def _whitened_nnls(mat: np.ndarray, v: np.ndarray, whiten_rtol: float) -> np.ndarray:
    """NNLS of v on the columns of mat, in the truncated-PCA whitened coordinates of mat."""
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    rank = int(np.sum(s > whiten_rtol * s[0])) if s[0] > 0 else 0
    if rank == 0:
        return np.zeros(mat.shape[1])
    a = vt[:rank]
    b = (u[:, :rank].T @ v) / s[:rank]
    w, _ = nnls(a, b, maxiter=50 * max(mat.shape[1], 1))
    return w


def decompose(v_div: torch.Tensor, concepts: dict[str, torch.Tensor], method: Method = "lstsq",
              e_decomp: float = 0.2, whiten_rtol: float = 1e-2) -> Decomposition:
    """Weights w minimising ``|v_div - sum_i w_i f(C_i)|`` over the given concepts.

    Methods:
        "lstsq": ordinary least squares (``numpy.linalg.lstsq``), weights of any sign.
        "whitened_nnls": write the concept matrix as ``F = U S V^T``, keep the principal
            components with ``s_i > whiten_rtol * s_max`` (truncated PCA: it drops the
            near-degenerate directions that near-duplicate concepts create, capping the
            whitening's condition number at ``1 / whiten_rtol``), and solve
            ``min_{w >= 0} |V_r^T w - S_r^{-1} U_r^T v_div|`` with scipy's NNLS: the fit in
            the metric where every principal direction of the concept set counts the
            same, so a direction shared by all f(C) does not dominate. With full rank and
            a non-negative lstsq solution it returns exactly the lstsq weights.

    The residual and ``e`` are always measured in the original space.

    Args:
        v_div: [D] divergence vector.
        concepts: ``{name: f(C) [D]}``, in the order to report.
        method: "lstsq" or "whitened_nnls".
        e_decomp: residual bound in (0, 1] (paper: 0.2), stored for ``within_bound``.
        whiten_rtol: relative singular-value cut-off of the truncated PCA, in (0, 1).
    """
    v = check_v_div(v_div)
    method = _check_method(method)
    e_decomp = _check_e_decomp(e_decomp)
    names, mat = concept_matrix(concepts, v.shape[0])
    if method == "lstsq":
        w = np.linalg.lstsq(mat, v, rcond=None)[0]
    else:
        if not (0.0 < float(whiten_rtol) < 1.0):
            raise ValueError(f"whiten_rtol must be in (0, 1), got {whiten_rtol}.")
        w = _whitened_nnls(mat, v, float(whiten_rtol))
    residual = v - mat @ w
    e = float(np.linalg.norm(residual) / np.linalg.norm(v))
    return Decomposition(names=names, weights=torch.from_numpy(np.asarray(w, dtype=np.float64)),
                         residual=torch.from_numpy(residual), relative_residual=e, method=method,
                         e_decomp=e_decomp)


def greedy_decompose(v_div: torch.Tensor, concepts: dict[str, torch.Tensor], order: Sequence[str] | None = None,
                     method: Method = "lstsq", e_decomp: float = 0.2, eps_ortho: float = 0.1,
                     whiten_rtol: float = 1e-2) -> tuple[Decomposition, list[float]]:
    """Add concepts one at a time in the filter's order until ``e < e_decomp``.

    Args:
        v_div: [D] divergence vector.
        concepts: ``{name: f(C) [D]}``.
        order: names to try, in order; default ``orthogonal_filter(v_div, concepts, eps_ortho)``.
        method, e_decomp, whiten_rtol: as in `decompose`.
        eps_ortho: only used when ``order`` is None.

    Returns:
        ``(decomposition, trace)``: the decomposition on the first k concepts, where k is
        the first step with ``e < e_decomp`` (or all of ``order`` if the bound is never
        met: then ``decomposition.within_bound`` is False), and ``e`` after each step.
    """
    check_v_div(v_div)
    _check_method(method)
    _check_e_decomp(e_decomp)
    if order is None:
        order = orthogonal_filter(v_div, concepts, eps_ortho=eps_ortho)
    order = list(order)
    if not order:
        raise ValueError("order is empty: pass at least one concept name (e.g. from orthogonal_filter).")
    missing = [n for n in order if n not in concepts]
    if missing:
        raise ValueError(f"order names concepts that are not in concepts: {missing}.")
    trace: list[float] = []
    dec: Decomposition | None = None
    for k in range(1, len(order) + 1):
        dec = decompose(v_div, {n: concepts[n] for n in order[:k]}, method=method, e_decomp=e_decomp,
                        whiten_rtol=whiten_rtol)
        trace.append(dec.relative_residual)
        if dec.within_bound:
            break
    assert dec is not None
    return dec, trace


# ----------------------------------------------------------------------------- language


def level_phrase(weight: float) -> str:
    """Level words for one weight, from |w| rounded to 2 decimals.

    ``|w| >= 0.5``: "much more"/"much less"; ``0.2 <= |w| < 0.5``: "more"/"less";
    ``0.05 <= |w| < 0.2``: "slightly more"/"slightly less"; below 0.05: "" (no clear change).
    """
    w = round(float(weight), 2)
    if not math.isfinite(w):
        raise ValueError(f"weight must be finite, got {weight}.")
    for threshold, word in LEVEL_THRESHOLDS:
        if abs(w) >= threshold:
            return f"{word}{'more' if w > 0 else 'less'}"
    return ""


def explain(decomposition: Decomposition) -> list[str]:
    """One sentence per concept, in the decomposition's order, with its weight.

    ``"{level} {concept} ({w:.2f})"`` with the level words of `level_phrase`, e.g.
    "much more striped (0.62)", "slightly more warm palette (0.18)", "less outlined (-0.20)";
    for ``|w| < 0.05``: "no clear change in {concept} (0.03)".
    """
    out = []
    for name, weight in zip(decomposition.names, decomposition.weights.tolist()):
        level = level_phrase(weight)
        w = round(float(weight), 2) + 0.0  # + 0.0 turns -0.0 into 0.0
        out.append(f"{level} {name} ({w:.2f})" if level else f"no clear change in {name} ({w:.2f})")
    return out

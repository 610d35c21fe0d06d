"""``persviz finexl explain``: FineXL's paired samples and decomposition for one model pair (a pipeline without and
with one LoRA), sharded over processes (persviz.shards).

    result = explain_pair(pipe, "data/finexl/lora/red_100", probes, "explain/", seeds=(0, 1000), chunk=8, clip=clip)

One cell is a chunk of the probe prompts, ``cell(prompts=[a, b])``; it draws the paired samples of those prompts
(base and with the LoRA, the same seeds) and returns each pair's normalised CLIP image-embedding difference
``normalise(E(personal)) - normalise(E(base))``, the quantity V_div averages. Image (probe k, seed index j) is drawn
with seed ``seeds[j] + k``, the convention of `persviz.finexl.generators.paired_samples` on the whole probe set,
never the cell's place, so any sharding gives the same pairs. The main process gathers the pairs in probe order,
computes V_div (their mean) and its spread, the concept directions f(C) of the bank on the probes, and each method's
decomposition (`persviz.finexl.benchmark.METHOD_SPECS`: the paper's FineXL, and on ShapesWorld persviz's
grammar-aware one), and writes OUT/explain.json atomically.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from persviz.families.base import Pipeline
from persviz.finexl.benchmark import COMPOSERS, E_DECOMP, LORA_DIR, METHOD_SPECS, N_PROBES, PROBE_SEED, explain_with
from persviz.finexl.concept_pair import N_PROBES as FULL_PROBES
from persviz.finexl.concept_pair import FineXLTarget, class_probes, lora_target
from persviz.finexl.concepts import (ART_BANK, SHAPESWORLD_WORD_BANK, SHAPESWORLD_WORD_PHRASES, concept_directions,
                                     rank_concepts, readable)
from persviz.finexl.decompose import check_v_div, explain
from persviz.finexl.generators import lora_pair, shapesworld_probes
from persviz.constants import EXPLAIN_CHUNK as CHUNK
from persviz.generation import GUIDANCE, STEPS
from persviz.io import PathLike, write_json
from persviz.shards import cell, run_cells

EXPLAIN_JSON = "explain.json"
FORMAT = "persviz finexl explain 1"
SEEDS: tuple[int, ...] = (0, 1000)
#: The methods reported by default: on ShapesWorld the paper's FineXL and persviz's (grammar f(C)); at full scale
#: (no caption grammar) the paper's and its whitened-NNLS improvement.
SHAPESWORLD_METHODS: tuple[str, ...] = ("finexl", "persviz")
FULL_METHODS: tuple[str, ...] = ("finexl", "finexl_improved")


def pair_target(lora: PathLike, class_word: Optional[str] = None) -> FineXLTarget:
    """`concept_pair.lora_target` of a LoRA file or folder or a concept folder; a name that is no path but a shipped
    ShapesWorld variant (``red_100``, see data/finexl/lora/) stands for that variant's LoRA."""
    path = Path(lora).expanduser()
    if not path.exists() and (LORA_DIR / str(lora)).is_dir():
        path = LORA_DIR / str(lora)
    return lora_target(path, class_word)


def pair_inputs(shapesworld: bool, class_word: str, n_probes: Optional[int] = None) -> dict[str, Any]:
    """{probes, bank, methods, phrases} of a scale: on ShapesWorld the benchmark's probes (one object each), its
    word bank and FineXL vs persviz; at full scale SD 1.5 contextual prompts with the class word, the ART bank and
    FineXL vs its whitened-NNLS improvement (the paper's ", C" append)."""
    if shapesworld:
        probes = shapesworld_probes(int(n_probes or N_PROBES), seed=PROBE_SEED, p_second=0.0)[0]
        return {"probes": probes, "bank": list(SHAPESWORLD_WORD_BANK), "methods": list(SHAPESWORLD_METHODS),
                "phrases": dict(SHAPESWORLD_WORD_PHRASES)}
    return {"probes": class_probes(class_word, int(n_probes or FULL_PROBES)), "bank": list(ART_BANK),
            "methods": list(FULL_METHODS), "phrases": {}}


def explain_cells(n_probes: int, chunk: Optional[int] = CHUNK) -> list[dict]:
    """The cells: chunks of `chunk` probe prompts, ``cell(prompts=[a, b])`` (None or 0: all probes in one cell)."""
    if int(n_probes) < 1:
        raise ValueError(f"FineXL needs at least one probe prompt; got {n_probes}")
    chunk = int(n_probes) if not chunk else int(chunk)
    if chunk < 1:
        raise ValueError(f"--chunk must be at least 1; got {chunk}")
    return [cell(prompts=[a, min(a + chunk, int(n_probes))]) for a in range(0, int(n_probes), chunk)]


def check_seeds(seeds: Sequence[int], n_probes: int) -> list[int]:
    """The call seeds as ints, distinct and spaced by at least n_probes (no two images share their noise)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("FineXL needs at least one seed")
    ordered = sorted(seeds)
    if any(b - a < int(n_probes) for a, b in zip(ordered, ordered[1:])):
        raise ValueError(f"seeds {seeds} are closer than the {n_probes} probes: image (probe k, seed s) uses s + k, "
                         f"so space them by at least {n_probes} (e.g. 0, 1000)")
    return seeds


def pair_differences(emb_personal: Any, emb_base: Any) -> np.ndarray:
    """float64 [N, D]: normalise(e_personal) - normalise(e_base) of each pair (rows paired)."""
    p = np.asarray(emb_personal.detach().cpu() if hasattr(emb_personal, "detach") else emb_personal, np.float64)
    b = np.asarray(emb_base.detach().cpu() if hasattr(emb_base, "detach") else emb_base, np.float64)
    if p.shape != b.shape or p.ndim != 2:
        raise ValueError(f"embeddings {p.shape} and {b.shape}: pass [N, D] of both, paired")
    return p / np.linalg.norm(p, axis=1, keepdims=True) - b / np.linalg.norm(b, axis=1, keepdims=True)


def chunk_differences(base: Any, personal: Any, clip: Any, prompts: Sequence[str], first: int,
                      seeds: Sequence[int]) -> list[list[list[float]]]:
    """[probe][seed index][D]: the pair differences of `prompts`, the probes first, first + 1, ... of the whole set;
    image (probe k, seed s) is drawn with seed s + k by both generators."""
    prompts = list(prompts)
    out: list[list[list[float]]] = [[] for _ in prompts]
    for s in seeds:
        b = base(prompts, int(s) + int(first))
        p = personal(prompts, int(s) + int(first))
        d = pair_differences(clip.embed_images(p), clip.embed_images(b))
        for k in range(len(prompts)):
            out[k].append(d[k].tolist())
    return out


def gather_differences(results: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """float64 [P, S, D]: every cell's pair differences in probe order."""
    rows = [r for c in cells for r in results[c["id"]]["diffs"]]
    return np.asarray(rows, dtype=np.float64)


def divergence_from_differences(diffs: np.ndarray) -> tuple[torch.Tensor, float]:
    """(V_div, spread) from per-pair differences [P, S, D] (or [N, D]), as `divergence_vector` computes them from
    the embeddings: the mean difference and the norm of the per-dimension standard deviation over all pairs."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d.reshape(-1, d.shape[-1])
    return torch.from_numpy(check_v_div(d.mean(axis=0))), float(np.linalg.norm(d.std(axis=0)))


def decompose_pair(v_div: torch.Tensor, directions: Mapping[str, Mapping[str, torch.Tensor]],
                   methods: Sequence[str], phrases: Optional[Mapping[str, str]] = None) -> dict[str, dict]:
    """{method: {compose, solver, e_ortho, names, weights, relative_residual, within_bound, sentences, cosines}}:
    each method's decomposition of v_div (`benchmark.explain_with`) on directions[its compose]."""
    phrases = dict(phrases or {})
    out = {}
    for m in methods:
        spec = METHOD_SPECS[m]
        f = directions[spec.compose]
        dec = explain_with(spec, v_div, f)
        out[m] = {"compose": spec.compose, "solver": spec.solver, "e_ortho": spec.e_ortho,
                  "positive_only": spec.positive_only, "names": list(dec.names), "weights": dec.as_dict(),
                  "relative_residual": dec.relative_residual, "within_bound": dec.within_bound,
                  "residual_norm": float(dec.residual.norm()), "sentences": explain(readable(dec, phrases)),
                  "cosines": dict(rank_concepts(v_div, f))}
    return out


def check_methods(methods: Sequence[str], composers: Sequence[str]) -> list[str]:
    """The method names, each known and with its compose available."""
    methods = list(methods)
    unknown = [m for m in methods if m not in METHOD_SPECS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; choose from {sorted(METHOD_SPECS)}")
    missing = [m for m in methods if METHOD_SPECS[m].compose not in composers]
    if missing:
        raise ValueError(f"method(s) {missing} need f(C) by {sorted({METHOD_SPECS[m].compose for m in missing})}, "
                         f"which this scale lacks (grammar: ShapesWorld captions only)")
    return methods


def explain_pair(pipe: Pipeline, lora: PathLike, probes: Sequence[str], out: PathLike, seeds: Sequence[int] = SEEDS,
                 chunk: Optional[int] = CHUNK, clip: Any = None, bank: Sequence[str] = (),
                 methods: Sequence[str] = SHAPESWORLD_METHODS, composers: Optional[Sequence[str]] = None,
                 phrases: Optional[Mapping[str, str]] = None, steps: int = STEPS, guidance: float = GUIDANCE,
                 batch_size: int = 8, settings: Optional[Mapping[str, Any]] = None, state: Any = None,
                 progress: bool = True) -> Optional[dict[str, Any]]:
    """FineXL for `pipe` without and with the LoRA file or folder `lora`, its cells in OUT/cells/, the result
    OUT/explain.json (returned on the main process; None on the others). A killed run resumes with the missing
    cells. The LoRA is unloaded from `pipe` afterwards.

    composers: which f(C) to build ('append', 'grammar'; default those the methods need). settings: what else the
    result depends on (model, label), kept in the manifest and the result."""
    probes = [str(p) for p in probes]
    seeds = check_seeds(seeds, len(probes))
    cells = explain_cells(len(probes), chunk)
    composers = list(composers or dict.fromkeys(METHOD_SPECS[m].compose for m in methods if m in METHOD_SPECS))
    methods = check_methods(methods, composers)
    if clip is None:
        raise ValueError("explain_pair needs the CLIP evaluator (clip=load_evaluator(kind='clip'))")
    bank = list(bank)
    if not bank:
        raise ValueError("explain_pair needs a concept bank (e.g. SHAPESWORLD_WORD_BANK, ART_BANK)")
    lora = Path(lora).expanduser()
    grid = {"prompts": len(probes), "seeds": seeds, "chunk": int(chunk or len(probes)), "steps": int(steps),
            "guidance": float(guidance), "batch_size": int(batch_size)}
    manifest = {**grid, **dict(settings or {}), "lora": str(lora.resolve()), "probes": probes}
    base, personal = lora_pair(pipe, lora, steps=int(steps), guidance=float(guidance), batch_size=int(batch_size))

    def compute(c: dict) -> dict:
        a, b = c["prompts"]
        return {"prompts": [a, b], "diffs": chunk_differences(base, personal, clip, probes[a:b], a, seeds)}

    try:
        results = run_cells(cells, compute, out, manifest, state=state, progress=progress, desc="FineXL pairs")
    finally:
        pipe.unload_lora_weights()
    if results is None:
        return None
    diffs = gather_differences(results, cells)
    v_div, spread = divergence_from_differences(diffs)
    directions = {k: concept_directions(clip.embed_texts, probes, bank, compose=COMPOSERS[k]) for k in composers}
    n = diffs.shape[0] * diffs.shape[1]
    result = {"format": FORMAT, "lora": str(lora.resolve()), **dict(settings or {}), "settings": grid,
              "counts": {"probes": diffs.shape[0], "seeds": diffs.shape[1], "pairs": n, "cells": len(cells)},
              "concepts": bank, "e_decomp": E_DECOMP,
              "v_div_norm": float(v_div.norm()), "spread": spread, "standard_error": spread / float(np.sqrt(n)),
              "v_div": v_div.tolist(), "methods": decompose_pair(v_div, directions, methods, phrases),
              "probes": probes}
    write_json(Path(out) / EXPLAIN_JSON, result)
    return result


__all__ = ["CHUNK", "EXPLAIN_JSON", "FORMAT", "FULL_METHODS", "SEEDS", "SHAPESWORLD_METHODS", "check_methods", "check_seeds", "chunk_differences", "decompose_pair",
           "divergence_from_differences", "explain_cells", "explain_pair", "gather_differences", "pair_differences",
           "pair_inputs", "pair_target"]

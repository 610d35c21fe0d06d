"""Model pairs for the FineXL explorer: the user's V_div plus renderer variants whose levels are known exactly.

    variants, known_by = explorer_variants(v_div, known, "LoRA mix_large067_red100", clip, probes, scenes)
    FineXLExplorer(variants, directions, known=known_by, ...)

A renderer variant is `SceneShiftGenerator(rates)` against the plain renderer on the same probes and seed, so its
V_div is cheap (no diffusion) and its true level of each aspect is its rate.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from persviz.finexl.benchmark import ASPECT_WORD
from persviz.finexl.decompose import divergence_vector
from persviz.finexl.generators import SceneShiftGenerator, check_rates

#: The renderer variants notebook 03's explorer offers beside its LoRA.
EXPLORER_RATES: tuple[dict[str, float], ...] = ({"dark": 0.67}, {"red": 1.0}, {"large": 0.5, "striped": 1.0})


def renderer_variant_name(rates: Mapping[str, float]) -> str:
    """'renderer dark 0.67', 'renderer large 0.5 + striped 1'."""
    if not rates:
        raise ValueError("a renderer variant needs at least one aspect rate")
    return "renderer " + " + ".join(f"{a} {p:g}" for a, p in rates.items())


def renderer_variants(clip: Any, probes: Sequence[str], scenes: Sequence[Any],
                      rates: Sequence[Mapping[str, float]] = EXPLORER_RATES,
                      seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """({name: V_div}, {name: {concept word: known level}}) of each scene shift in `rates` against the plain renderer.

    probes, scenes: as `shapesworld_probes` returns them (the renderer draws each prompt's scene).
    clip: an evaluator with `embed_images`."""
    if len(probes) != len(scenes):
        raise ValueError(f"{len(probes)} probes but {len(scenes)} scenes")
    by_prompt = dict(zip(probes, scenes))
    probes = list(probes)
    base = clip.embed_images(SceneShiftGenerator({}, scenes=by_prompt)(probes, seed))
    variants, known = {}, {}
    for r in rates:
        r = dict(check_rates(r))
        name = renderer_variant_name(r)
        shifted = clip.embed_images(SceneShiftGenerator(r, scenes=by_prompt)(probes, seed))
        variants[name] = divergence_vector(shifted, base)[0]
        known[name] = {ASPECT_WORD[a]: p for a, p in r.items()}
    return variants, known


def explorer_variants(v_div: torch.Tensor, known: Mapping[str, float], label: str, clip: Any = None,
                      probes: Optional[Sequence[str]] = None, scenes: Optional[Sequence[Any]] = None,
                      rates: Sequence[Mapping[str, float]] = EXPLORER_RATES,
                      seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """The explorer's pairs: `label` -> v_div (levels `known`), then the renderer variants when `scenes` is given
    (ShapesWorld; at full scale there is no renderer, pass scenes=None)."""
    variants, known_by = {label: v_div}, {label: dict(known)}
    if scenes is not None:
        if clip is None or probes is None:
            raise ValueError("renderer variants need the clip evaluator and the probes with the scenes")
        more, more_known = renderer_variants(clip, probes, scenes, rates, seed)
        clash = sorted(set(more) & set(variants))
        if clash:
            raise ValueError(f"variant names used twice: {clash}")
        variants.update(more)
        known_by.update(more_known)
    return variants, known_by


__all__ = ["EXPLORER_RATES", "explorer_variants", "renderer_variant_name", "renderer_variants"]

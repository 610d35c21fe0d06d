"""Batched, seeded generation with any diffusers text-to-image pipeline."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from persviz.constants import GUIDANCE

STEPS = 25


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seed: int = 0, guidance: float = GUIDANCE, steps: int = STEPS,
             batch_size: int = 50, **pipe_kwargs) -> np.ndarray:
    """One image per prompt, image i seeded with seed + i (so a batch split never changes a result); uint8 [N,H,W,3]."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("generate takes a non-empty list of prompts")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=len(prompts) <= batch_size):
        chunk = list(prompts[i:i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        res = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np",
                   **pipe_kwargs).images
        out.append(np.clip(np.round(res * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def generate_from_embeds(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, seed: int = 0,
                         guidance: float = GUIDANCE, steps: int = STEPS, batch_size: int = 50,
                         pooled_prompt_embeds: torch.Tensor | None = None,
                         negative_pooled_prompt_embeds: torch.Tensor | None = None, **pipe_kwargs) -> np.ndarray:
    """As generate, from encoded prompts [N, L, D] (e.g. prompt-level TEA) and, for a pipeline that reads them
    (SDXL), pooled ones [N, P]; image i is seeded seed + i. ``generate_from_embeds(pipe, **embeds_kwargs(embeds))``
    takes persviz.tea.encode_prompt_level's result."""
    if prompt_embeds.ndim != 3 or prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"prompt_embeds and negative_prompt_embeds must both be [N, L, D]; got "
                         f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}")
    pooled = {k: v for k, v in (("pooled_prompt_embeds", pooled_prompt_embeds),
                                ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)) if v is not None}
    for k, v in pooled.items():
        if v.ndim != 2 or len(v) != len(prompt_embeds):
            raise ValueError(f"{k} must be [N, P] with N = {len(prompt_embeds)}, as prompt_embeds; got {tuple(v.shape)}")
    out = []
    for i in range(0, len(prompt_embeds), batch_size):
        pe, ne = prompt_embeds[i:i + batch_size], negative_prompt_embeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(pe))]
        res = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np", **{k: v[i:i + batch_size] for k, v in pooled.items()},
                   **pipe_kwargs).images
        out.append(np.clip(np.round(res * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)

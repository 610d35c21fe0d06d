"""The settings a personalization run starts from: ShapesWorld's for the embedded micro-SD, the TEA paper's for any
other model (SD 1.5), and the token checks that must pass before anything is written.

Paper (docs/tea.md §8): Textual Inversion lr 5e-4, 3000 steps, a snapshot every 100; DreamBooth-LoRA rank 4,
lr 1e-4, text encoder trained, prior preservation weight 1.0 with class images from the base model; Custom
Diffusion lr 5e-6, 2000 steps, cross-attention K/V. Where the paper and diffusers' example scripts differ the
paper's hyper-parameters are used, with the examples' image preprocessing (centre crop, bicubic resize; flips for
Textual Inversion). ShapesWorld's micro-SD needs larger learning rates (below, with the reasons) and its captions'
grammar for the templates.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from persviz.methods import get_method
from persviz.tokens import DREAMBOOTH_IDENTIFIER, SHAPESWORLD_SAMPLING

SHAPESWORLD_TEMPLATES = ("a {}", "a photo of a {}", "an image of a {}", "a picture of a {}")
# Which command-line names each config calls its settings by.
_FIELDS = {"steps": "steps", "save_every": "save_every", "resolution": "resolution", "lr": "lr",
           "batch_size": "batch_size", "seed": "seed", "num_class_images": "num_class_images"}


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """cfg with the given settings (steps, save_every, resolution, lr, batch_size, seed, num_class_images) where not
    None; a ValueError naming an unknown one."""
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {sorted(_FIELDS)}")
    return replace(cfg, **{_FIELDS[k]: v for k, v in overrides.items() if v is not None})


def recipe(method: str, token: str, class_word: str, shapesworld: bool, **overrides: Any) -> Any:
    """The config of a run of `method` learning `token` (Textual Inversion's placeholder, DreamBooth's identifier,
    Custom Diffusion's modifier token) for a concept of class `class_word`; `overrides` (steps, save_every,
    resolution, lr, batch_size, seed, num_class_images) replace the defaults where not None. The defaults live in
    each method's module (persviz.methods)."""
    return get_method(method).recipe(token, class_word, shapesworld, **overrides)


def check_tokens(tokenizer: Any, method: str, token: str, class_word: str) -> None:
    """Before anything is written: for Textual Inversion and Custom Diffusion the class word must be one token of the
    tokenizer (it initialises the learned row) and the placeholder / modifier token must be new; DreamBooth's
    identifier (e.g. 'sks') is an existing rare token by design and only has to be one word."""
    get_method(method).check_tokens(tokenizer, token, class_word)


__all__ = ["DREAMBOOTH_IDENTIFIER", "SHAPESWORLD_SAMPLING", "SHAPESWORLD_TEMPLATES", "apply_overrides", "check_tokens",
           "recipe"]

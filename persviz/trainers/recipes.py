"""The settings a personalization run starts from, and the token checks that must pass before anything is written.

The settings live with the model family (``persviz.families``: ``Family.recipes``): SD 1.x the TEA paper's
(docs/tea.md §8: Textual Inversion lr 5e-4, 3000 steps, a snapshot every 100; DreamBooth-LoRA rank 4, lr 1e-4, text
encoder trained, prior preservation weight 1.0 with class images from the base model; Custom Diffusion lr 5e-6, 2000
steps, cross-attention K/V), ShapesWorld's micro-SD its own changes (larger learning rates, its captions' grammar;
``persviz/families/sd1.py`` with the reasons), SDXL the defaults of diffusers' SDXL example scripts
(``persviz/families/sdxl.py``, each cited). Each method builds its config from them (``Method.recipe``,
``persviz.methods``); this module keeps the function callers have always used.
"""
from __future__ import annotations

from typing import Any

from persviz.families.sd1 import SHAPESWORLD_TEMPLATES
from persviz.methods import get_method
from persviz.methods.base import apply_overrides
from persviz.tokens import DREAMBOOTH_IDENTIFIER, SHAPESWORLD_SAMPLING


def recipe(method: str, token: str, class_word: str, shapesworld: bool, family: Any = None, **overrides: Any) -> Any:
    """The config of a run of `method` learning `token` (Textual Inversion's placeholder, DreamBooth's identifier,
    Custom Diffusion's modifier token) for a concept of class `class_word`; `overrides` (steps, save_every,
    resolution, lr, batch_size, seed, num_class_images) replace the defaults where not None. The defaults are the
    family's (family: a persviz.families Family or its name, 'sd1' or 'sdxl'; None: SD 1.x, whose embedded
    micro-SD's when `shapesworld`)."""
    return get_method(method, concept_only=False).recipe(token, class_word, shapesworld, family=family, **overrides)


def check_tokens(tokenizer: Any, method: str, token: str, class_word: str) -> None:
    """Before anything is written: for Textual Inversion and Custom Diffusion the class word must be one token of the
    tokenizer (it initialises the learned row) and the placeholder / modifier token must be new; DreamBooth's
    identifier (e.g. 'sks') is an existing rare token by design and only has to be one word."""
    get_method(method).check_tokens(tokenizer, token, class_word)


__all__ = ["DREAMBOOTH_IDENTIFIER", "SHAPESWORLD_SAMPLING", "SHAPESWORLD_TEMPLATES", "apply_overrides", "check_tokens",
           "recipe"]

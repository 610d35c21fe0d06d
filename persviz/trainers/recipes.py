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

from persviz.embeddings import single_token_id
from persviz.trainers import METHODS
from persviz.trainers.custom_diffusion import CustomDiffusionConfig
from persviz.trainers.dreambooth_lora import DreamBoothLoRAConfig
from persviz.trainers.textual_inversion import TextualInversionConfig

SHAPESWORLD_TEMPLATES = ("a {}", "a photo of a {}", "an image of a {}", "a picture of a {}")
SHAPESWORLD_SAMPLING = {"class_steps": 25, "class_guidance": 4.0}  # the micro-SD's documented sampling settings
DREAMBOOTH_IDENTIFIER = "sks"
# Which command-line names each config calls its settings by.
_FIELDS = {"steps": "steps", "save_every": "save_every", "resolution": "resolution", "lr": "lr",
           "batch_size": "batch_size", "seed": "seed", "num_class_images": "num_class_images"}


def recipe(method: str, token: str, class_word: str, shapesworld: bool, **overrides: Any) -> Any:
    """The config of a run of `method` learning `token` (Textual Inversion's placeholder, DreamBooth's identifier,
    Custom Diffusion's modifier token) for a concept of class `class_word`; `overrides` (steps, save_every,
    resolution, lr, batch_size, seed, num_class_images) replace the defaults where not None."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    cw = class_word
    if method == "textual_inversion":
        cfg = TextualInversionConfig(placeholder=token, initializer=cw)
        if shapesworld:  # 1e-3 so the drift the paper sees on SD 1.5 happens in 3000 steps on 128-d rows
            cfg = replace(cfg, lr=1e-3, templates=SHAPESWORLD_TEMPLATES)
    elif method == "dreambooth":
        cfg = DreamBoothLoRAConfig(identifier=token, class_word=cw, instance_prompt=f"a photo of a {token} {cw}",
                                   class_prompt=f"a photo of a {cw}")
        if shapesworld:  # at the paper's 1e-4 the micro-SD's LoRA learned the concepts too little to measure
            cfg = replace(cfg, lr=1e-3, save_every=100, **SHAPESWORLD_SAMPLING)
    else:
        cfg = CustomDiffusionConfig(modifier_token=token, class_word=cw, instance_prompt=f"a photo of a {token} {cw}")
        if shapesworld:  # 5e-6 leaves the micro-SD's small projections unchanged; no resize augmentation on 16x16
            cfg = replace(cfg, steps=1000, lr=1e-4, save_every=100, augment=False, **SHAPESWORLD_SAMPLING)
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {sorted(_FIELDS)}")
    changes = {_FIELDS[k]: v for k, v in overrides.items() if v is not None}
    if method == "textual_inversion":
        changes.pop("num_class_images", None)  # no class images in Textual Inversion
    return replace(cfg, **changes)


def check_tokens(tokenizer: Any, method: str, token: str, class_word: str) -> None:
    """Before anything is written: for Textual Inversion and Custom Diffusion the class word must be one token of the
    tokenizer (it initialises the learned row) and the placeholder / modifier token must be new; DreamBooth's
    identifier (e.g. 'sks') is an existing rare token by design and only has to be one word."""
    if method in ("textual_inversion", "custom_diffusion"):
        if single_token_id(tokenizer, class_word) is None:
            pieces = tokenizer.tokenize(class_word)
            raise ValueError(f"the class word {class_word!r} is {len(pieces)} tokens for this tokenizer ({pieces}); "
                             "pick a class word that is one token, such as 'dog', 'toy' or 'square'")
        existing = single_token_id(tokenizer, token)
        if existing is not None:
            raise ValueError(f"the placeholder {token!r} is already a token of the tokenizer (id {existing}); pick a "
                             "new string such as '<my-concept>'")
    elif not token.strip() or len(token.split()) != 1:
        raise ValueError(f"DreamBooth's identifier must be one word, such as {DREAMBOOTH_IDENTIFIER!r}; got {token!r}")


__all__ = ["DREAMBOOTH_IDENTIFIER", "SHAPESWORLD_SAMPLING", "SHAPESWORLD_TEMPLATES", "check_tokens", "recipe"]

"""The trainers' config validators: each raises a ValueError naming the field, its value and what it takes."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from persviz.embeddings import single_token_id


def as_int(cfg: Any, name: str, minimum: int) -> None:
    """Checks that cfg.<name> is an int >= minimum and stores it as a Python int (frozen dataclasses too)."""
    v = getattr(cfg, name)
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ValueError(f"{name} must be an int; got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {v}")
    object.__setattr__(cfg, name, int(v))


def as_float(cfg: Any, name: str, low: float, high: float = float("inf"), open_low: bool = False) -> None:
    """Checks that cfg.<name> is a finite number in [low, high] ((low, high] if open_low) and stores a float."""
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
    if ok:
        ok = (v > low if open_low else v >= low) and v <= high
    if not ok:
        rng = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {rng}; got {v!r}")
    object.__setattr__(cfg, name, float(v))


def as_bool(cfg: Any, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        raise ValueError(f"{name} must be True or False; got {getattr(cfg, name)!r}")


def as_word(cfg: Any, name: str, example: str) -> None:
    """Checks that cfg.<name> is a non-empty string without whitespace."""
    v = getattr(cfg, name)
    if not isinstance(v, str) or not v or any(c.isspace() for c in v):
        raise ValueError(f"{name} must be a non-empty string without spaces, e.g. {example!r}; got {v!r}")


def as_prompt(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a non-empty string; got {v!r}")


def as_class_word(cfg: Any) -> None:
    if not isinstance(cfg.class_word, str) or not cfg.class_word.strip():
        raise ValueError(f"class_word must be the concept's class such as 'square' or 'dog'; got {cfg.class_word!r}")


def default_prompts(cfg: Any, instance_prompt: str) -> None:
    """Fills in instance_prompt (with the given default) and class_prompt ("a photo of a {class_word}") where None,
    and checks both are non-empty strings."""
    if cfg.instance_prompt is None:
        object.__setattr__(cfg, "instance_prompt", instance_prompt)
    if cfg.class_prompt is None:
        object.__setattr__(cfg, "class_prompt", f"a photo of a {cfg.class_word}")
    as_prompt(cfg, "instance_prompt")
    as_prompt(cfg, "class_prompt")


# the ints of the DreamBooth-LoRA and Custom Diffusion configs, with their minimums
COMMON_INTS: tuple[tuple[str, int], ...] = (
    ("steps", 1), ("batch_size", 1), ("save_every", 1), ("seed", 0), ("num_class_images", 1), ("class_seed", 0),
    ("class_steps", 1), ("class_batch_size", 1))


def check_common_fields(cfg: Any, ints: Sequence[tuple[str, int]] = (), bools: Sequence[str] = ()) -> None:
    """Checks (and normalises) the fields the DreamBooth-LoRA and Custom Diffusion configs share: COMMON_INTS,
    prior_preservation, lr, weight_decay, flip_p, prior_loss_weight, class_guidance, max_grad_norm, resolution.

    Args:
        ints: (name, minimum) of the config's own ints, checked before the shared ones.
        bools: the config's own flags, checked before prior_preservation.
    """
    for name, low in (*ints, *COMMON_INTS):
        as_int(cfg, name, low)
    for name in (*bools, "prior_preservation"):
        as_bool(cfg, name)
    as_float(cfg, "lr", 0.0, open_low=True)
    as_float(cfg, "weight_decay", 0.0)
    as_float(cfg, "flip_p", 0.0, 1.0)
    as_float(cfg, "prior_loss_weight", 0.0)
    as_float(cfg, "class_guidance", 0.0)
    if cfg.max_grad_norm is not None:
        as_float(cfg, "max_grad_norm", 0.0, open_low=True)
    check_resolution(cfg)


def check_new_token(tokenizer: Any, token: str, what: str, unload_hint: str) -> None:
    """A ValueError if `token` is already one token of the tokenizer (a word of the vocabulary or an added token)."""
    existing = single_token_id(tokenizer, token)
    if existing is not None:
        how = (unload_hint if existing >= tokenizer.vocab_size
               else "pick a string that is not a word, such as '<my-concept>'")
        raise ValueError(f"{what} {token!r} is already a token of the pipeline's tokenizer (id {existing}); {how}")



def check_resolution(cfg: Any) -> None:
    r = cfg.resolution
    if r is not None and (not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1):
        raise ValueError(f"resolution must be a positive int or None; got {r!r}")
    if r is not None:
        object.__setattr__(cfg, "resolution", int(r))


__all__ = ["as_bool", "as_class_word", "as_float", "as_int", "as_prompt", "as_word", "check_common_fields",
           "check_new_token", "check_resolution", "default_prompts"]

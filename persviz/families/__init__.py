"""The registry of model families (one module per family behind ``persviz.families.base.Family``) and the one
pipeline assembler every command and the notebooks' setup use.

    from persviz.families import assemble_pipeline, family_of
    pipe = assemble_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # loaded, checked, prepared
    family_of(pipe).text_stack(pipe).primary.tokenizer

Adding a family: one module here defining a ``Family`` subclass and its ``FAMILY`` object, one line in
``_MODULES``, and its tests (docs/contributing.md). Nothing outside this package compares a family's name.
"""
from __future__ import annotations

import os
from importlib import import_module
from typing import Any

from persviz.families.base import Family, Pipeline, UnsupportedModelError

_MODULES = ("sd1",  # one line per family
            "sdxl")
FAMILIES: dict[str, Family] = {f.name: f for f in (import_module(f"persviz.families.{n}").FAMILY for n in _MODULES)}
DEFAULT_FAMILY: Family = FAMILIES["sd1"]  # the embedded micro-SD's family, and recipes' when a caller names none


def get_family(family: Family | str | None = None) -> Family:
    """A family object from itself or its name ('sd1', 'sdxl'); None: DEFAULT_FAMILY. An UnsupportedModelError
    listing the known names otherwise."""
    if family is None:
        return DEFAULT_FAMILY
    if isinstance(family, Family):
        return family
    if str(family) in FAMILIES:
        return FAMILIES[str(family)]
    raise UnsupportedModelError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def family_of(pipe: Pipeline, model: str | None = None) -> Family:
    """The family `pipe` belongs to; an UnsupportedModelError with the first family's sentence when none takes it."""
    name = str(model) if model is not None else type(pipe).__name__
    refusals = []
    for family in FAMILIES.values():
        why = family.refusal(pipe, name)
        if why is None:
            return family
        refusals.append(why)
    raise UnsupportedModelError(refusals[0])


def training_family(pipe: Pipeline, model: str | None = None) -> Family:
    """family_of(pipe), refused with a sentence when persviz does not train on that family yet."""
    family = family_of(pipe, model)
    if not family.trains:
        takes = " or ".join(f.label for f in FAMILIES.values() if f.trains)
        example = next(f.hub_ids[0] for f in FAMILIES.values() if f.trains and f.hub_ids)
        raise UnsupportedModelError(
            f"{model or type(pipe).__name__} is a {family.label} pipeline and persviz trains on {takes} only so far (runs to adopt and study too); "
            f"train on {example} (or a model fine-tuned from it), or inspect {family.label} embeddings with "
            "`persviz inspect FILE --model MODEL`")
    return family


def text_stack(pipe: Pipeline) -> Any:
    """The text encoders of a diffusion pipeline (persviz.text_stack.TextStack), as its family lays them out."""
    return family_of(pipe).text_stack(pipe)


def assemble_pipeline(model: Any = None, device: str | None = None, dtype: Any = None) -> Any:
    """The pipeline of `model` ('shapesworld' or None: the embedded micro-SD; a Hub id, a folder, or a loaded
    pipeline), loaded (persviz.loading.load_pipeline), checked against the families and prepared for persviz's
    studies by its family (at full scale the paper's sampler). The notebooks' setup and every command use it."""
    from persviz.loading import is_embedded, load_pipeline  # heavy: diffusers (the loader)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    family = family_of(pipe, None if model is None else str(model) if isinstance(model, (str, os.PathLike)) else None)
    if not isinstance(model, (str, os.PathLike)) and model is not None:
        return pipe  # a pipeline the caller already loaded and set up: checked, left as it is
    return family.prepare(pipe, embedded=is_embedded(model))


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "UnsupportedModelError", "assemble_pipeline", "family_of",
           "get_family", "text_stack", "training_family"]

"""Train a user's concept into a concept folder: what ``persviz train`` does.

    persviz train textual-inversion --images photos/ --class-word dog --placeholder "<my-dog>" --out my_dog/

Every input is checked before anything is written (the images, the tokens, the model's kind, an existing folder's
concept); then the images are copied into the folder, concept.json records the run, and the trainer runs (resuming
a run already there). Defaults follow the model: its family's recipes (``persviz.families``, ``Family.recipes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.families.base import Pipeline
from persviz.concept_folder import (Concept, ConceptFolderError, adopt_images, check_method, prepare_concept,
                                    write_concept)
from persviz.io import PathLike, check_write, confined
from persviz.families import assemble_pipeline, training_family
from persviz.loading import SHAPESWORLD, is_embedded
from persviz.methods import get_method
from persviz.tokens import DREAMBOOTH_IDENTIFIER
from persviz.families import text_stack


@dataclass
class ConceptRun:
    """A finished (or extended) run: the concept, the method, the run folder and the trainer's result."""

    concept: Concept
    method: str
    run_dir: Path
    result: Any


def model_id(model: str | PathLike | None) -> str:
    """What concept.json records for a model: 'shapesworld', a Hub id, or an absolute folder path."""
    if is_embedded(model):
        return SHAPESWORLD
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def check_sd1(pipe: Pipeline, model: str) -> None:
    """An UnsupportedModelError (a ValueError) for a pipeline of no family persviz trains on (persviz.families:
    today SD 1.x, ShapesWorld's micro-SD and SD-1.5-architecture test models of reduced width; SDXL is studied and
    inspected, not trained, so far)."""
    training_family(pipe, model)


def train_concept(method: str, images: PathLike, class_word: str, placeholder: str, out: PathLike,
                  model: str | PathLike | None = None, identifier: str | None = None, pipe: Pipeline = None,
                  progress: bool = True, **settings: Any) -> ConceptRun:
    """Train (or resume) one method's run of a concept into the folder `out`; returns the run.

    method: textual_inversion (or 'ti'), dreambooth, custom_diffusion. placeholder: the concept's new token (the
    learned token of Textual Inversion and Custom Diffusion); identifier: DreamBooth's rare token (default 'sks').
    settings: steps, save_every, resolution, lr, batch_size, seed, num_class_images, train_text_encoder (None keeps
    the recipe's; a setting the method's config does not have is left out). pipe: an already loaded
    pipeline of `model` (else it is loaded)."""
    method = check_method(method)
    mid = model_id(model)
    concept = prepare_concept(out, images, placeholder, class_word, mid)
    m = get_method(method)
    token = placeholder if m.learns_token else (identifier or DREAMBOOTH_IDENTIFIER)
    known = concept.runs.get(method)
    if known and known.get("source"):
        raise ConceptFolderError(f"the {method} run of {concept.folder} is adopted from {known['folder']} "
                                 f"({known['source']}), which persviz only reads; train into another --out folder")
    if known and known["token"] != token:
        raise ValueError(f"the {method} run in {concept.folder} learned {known['token']!r}, not {token!r}; use the "
                         "same token to extend it, or another --out folder")
    if pipe is None:
        pipe = assemble_pipeline(mid)
    family = training_family(pipe, mid, m)
    m.check_tokens(text_stack(pipe).primary.tokenizer, token, class_word)
    config = m.recipe(token, class_word, shapesworld=is_embedded(mid), family=family, **settings)
    with confined(concept.folder):
        adopt_images(concept, images)
        concept.runs[method] = {"folder": method, "token": token}
        write_concept(concept)
        run_dir = check_write(Path(concept.folder) / method)
        result = m.train(pipe, concept.reference_images(), config, run_dir, progress=progress, load_result=False)
    return ConceptRun(concept, method, run_dir, result)


__all__ = ["ConceptRun", "check_sd1", "model_id", "train_concept"]

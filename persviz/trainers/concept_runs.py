"""Train a user's concept into a concept folder: what ``persviz train`` does.

    persviz train textual-inversion --images photos/ --class-word dog --placeholder "<my-dog>" --out my_dog/

Every input is checked before anything is written (the images, the tokens, the model's kind, an existing folder's
concept); then the images are copied into the folder, concept.json records the run, and the trainer runs (resuming
a run already there). Defaults follow the model (``persviz.trainers.recipes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.concept_folder import (Concept, ConceptFolderError, adopt_images, check_method, prepare_concept,
                                    write_concept)
from persviz.io import PathLike, check_write, confined
from persviz.loading import SHAPESWORLD, load_pipeline
from persviz.trainers.custom_diffusion import train_custom_diffusion
from persviz.trainers.dreambooth_lora import train_dreambooth_lora
from persviz.trainers.recipes import DREAMBOOTH_IDENTIFIER, check_tokens, recipe
from persviz.trainers.textual_inversion import train_textual_inversion

TRAINERS = {"textual_inversion": train_textual_inversion, "dreambooth": train_dreambooth_lora,
            "custom_diffusion": train_custom_diffusion}
SD1_WIDTH = 768  # CLIP ViT-L/14's text width: SD 1.x
SD2_WIDTH = 1024  # OpenCLIP ViT-H's: SD 2.x (SDXL has two text encoders)


@dataclass
class ConceptRun:
    """A finished (or extended) run: the concept, the method, the run folder and the trainer's result."""

    concept: Concept
    method: str
    run_dir: Path
    result: Any


def model_id(model: str | PathLike | None) -> str:
    """What concept.json records for a model: 'shapesworld', a Hub id, or an absolute folder path."""
    if model is None or str(model) == SHAPESWORLD:
        return SHAPESWORLD
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def check_sd1(pipe: Any, model: str) -> None:
    """A ValueError for pipelines persviz does not support: SDXL (two text encoders) and SD 2.x (OpenCLIP ViT-H text
    encoder, width 1024). SD 1.x (CLIP ViT-L/14, width 768), ShapesWorld's micro-SD and SD-1.5-architecture test
    models of reduced width pass."""
    name = type(pipe).__name__
    if getattr(pipe, "text_encoder_2", None) is not None or "XL" in name:
        raise ValueError(f"{model} is an SDXL pipeline ({name}); persviz trains and studies Stable Diffusion 1.x "
                         "only: use stable-diffusion-v1-5/stable-diffusion-v1-5 or a model fine-tuned from it")
    encoder = getattr(pipe, "text_encoder", None)
    width = encoder.config.hidden_size if encoder is not None else None
    if width == SD2_WIDTH:
        raise ValueError(f"{model} has a text encoder of width {width} (OpenCLIP ViT-H: Stable Diffusion 2.x), not "
                         f"SD 1.x's {SD1_WIDTH}; persviz supports Stable Diffusion 1.x only")


def train_concept(method: str, images: PathLike, class_word: str, placeholder: str, out: PathLike,
                  model: str | PathLike | None = None, identifier: str | None = None, pipe: Any = None,
                  progress: bool = True, **settings: Any) -> ConceptRun:
    """Train (or resume) one method's run of a concept into the folder `out`; returns the run.

    method: textual_inversion (or 'ti'), dreambooth, custom_diffusion. placeholder: the concept's new token (the
    learned token of Textual Inversion and Custom Diffusion); identifier: DreamBooth's rare token (default 'sks').
    settings: steps, save_every, resolution, lr, batch_size, seed, num_class_images (None keeps the recipe's). pipe: an already loaded
    pipeline of `model` (else it is loaded)."""
    method = check_method(method)
    mid = model_id(model)
    concept = prepare_concept(out, images, placeholder, class_word, mid)
    token = (identifier or DREAMBOOTH_IDENTIFIER) if method == "dreambooth" else placeholder
    known = concept.runs.get(method)
    if known and known.get("source"):
        raise ConceptFolderError(f"the {method} run of {concept.folder} is adopted from {known['folder']} "
                                 f"({known['source']}), which persviz only reads; train into another --out folder")
    if known and known["token"] != token:
        raise ValueError(f"the {method} run in {concept.folder} learned {known['token']!r}, not {token!r}; use the "
                         "same token to extend it, or another --out folder")
    if pipe is None:
        pipe = load_pipeline(None if mid == SHAPESWORLD else mid)
    check_sd1(pipe, mid)
    check_tokens(pipe.tokenizer, method, token, class_word)
    config = recipe(method, token, class_word, shapesworld=mid == SHAPESWORLD, **settings)
    with confined(concept.folder):
        adopt_images(concept, images)
        concept.runs[method] = {"folder": method, "token": token}
        write_concept(concept)
        run_dir = check_write(Path(concept.folder) / method)
        result = TRAINERS[method](pipe, concept.reference_images(), config, run_dir, progress=progress,
                                  load_result=False)
    return ConceptRun(concept, method, run_dir, result)


__all__ = ["ConceptRun", "TRAINERS", "check_sd1", "model_id", "train_concept"]

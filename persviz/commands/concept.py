"""``persviz train`` and ``persviz adopt``: a concept folder's runs, trained here or by another tool."""
from __future__ import annotations

import argparse
from typing import Any

from persviz.commands.common import doc, threads

METHOD_CHOICES = ("textual-inversion", "ti", "dreambooth", "custom-diffusion")  # as users type them


def add_parser(sub: Any) -> None:
    """Adds ``train`` and ``adopt``."""
    p = sub.add_parser("train", help="train a concept of your own into a concept folder (resumable)",
                       description=doc("persviz.trainers.concept_runs"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=METHOD_CHOICES)
    p.add_argument("--images", required=True, help="folder of the concept's photos")
    p.add_argument("--class-word", required=True, help="the concept's class, one token (e.g. dog, toy)")
    p.add_argument("--placeholder", required=True, help="the concept's new token, e.g. '<my-dog>'")
    p.add_argument("--identifier", default=None, help="DreamBooth's rare token (default: sks)")
    p.add_argument("--out", required=True, help="the concept folder (created; an existing one is extended)")
    p.add_argument("--model", default=None,
                   help="Hub id, folder or single-file .safetensors checkpoint (default: the ShapesWorld micro-SD; SD 1.5 "
                        "with PERSVIZ_SCALE=full)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-class-images", type=int, default=None,
                   help="DreamBooth / Custom Diffusion prior-preservation images (generated once by the base model)")
    p.add_argument("--text-encoders", choices=("on", "off"), default=None,
                   help="DreamBooth-LoRA: LoRA on the text encoders' attention too (default: the model family's recipe: "
                        "on for SD 1.x as TEA, off for SDXL as train_dreambooth_lora_sdxl.py)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=train)

    p = sub.add_parser("adopt", help="register another tool's run folder (diffusers, A1111, kohya) in a concept folder",
                       description=doc("persviz.foreign_runs"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=METHOD_CHOICES)
    p.add_argument("run_folder", metavar="RUN", help="the folder (or LoRA file) the other tool wrote; recorded, not copied")
    p.add_argument("--out", required=True, help="the concept folder (created; an existing one is extended)")
    p.add_argument("--images", required=True, help="folder of the concept's photos")
    p.add_argument("--class-word", default=None, help="the concept's class, one token (e.g. dog, toy)")
    p.add_argument("--token", default=None,
                   help="the run's token where its files do not name it (DreamBooth's identifier: default sks)")
    p.add_argument("--model", default=None,
                   help="the model the run was trained on (default: the ShapesWorld micro-SD; SD 1.5 with "
                        "PERSVIZ_SCALE=full)")
    p.set_defaults(run=adopt)


def train(a: argparse.Namespace) -> Any:
    """Trains (or resumes) one method's run in the concept folder; returns the ConceptRun."""
    from persviz.loading import default_model
    from persviz.trainers import concept_runs
    threads(a.threads)
    run = concept_runs.train_concept(
        a.method, a.images, a.class_word, a.placeholder, a.out, a.model or default_model("pipeline"), a.identifier,
        progress=not a.no_progress,
        steps=a.steps, save_every=a.save_every, resolution=a.resolution, lr=a.lr, batch_size=a.batch_size,
        seed=a.seed, num_class_images=a.num_class_images,
        train_text_encoder=None if a.text_encoders is None else a.text_encoders == "on")
    print(f"{run.method}: {run.result.steps} steps in {run.run_dir} (concept folder {run.concept.folder})")
    return run


def adopt(a: argparse.Namespace) -> Any:
    """Checks another tool's run against the model and records it in the concept folder; returns the Concept."""
    from persviz import foreign_runs
    from persviz.concept_folder import check_method
    from persviz.loading import default_model
    concept = foreign_runs.adopt_run(a.method, a.run_folder, a.out, a.images, a.class_word, a.token,
                                     a.model or default_model("pipeline"))
    method = check_method(a.method)
    run = concept.runs[method]
    print(f"{method}: {run['source']} run {run['folder']} (token {run['token']!r}) in concept folder "
          f"{concept.folder}")
    return concept

"""The TEA study of one concept folder: what ``persviz study CONCEPT_DIR`` writes and notebooks 01-02 show.

1. the semantic-shift tracker over the Textual Inversion snapshots (text space: |V*|/|c|, cos(V*, c), the four
   distances), 2. the two-way impacts over training (image space: CLIP-T concept/context, CLIP-I, DINO-I, and the
   oracle on ShapesWorld), 3. the with/without-TEA table of every trained method (DreamBooth: prompt-level TEA,
   aligned and unaligned, anchored on the fine-tuned and on the base text encoder).
Written to ``CONCEPT_DIR/study/study.json`` with its figures beside it.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from persviz.concept_folder import Concept, read_concept
from persviz.embeddings import token_row
from persviz.io import write_json
from persviz.loading import SHAPESWORLD
from persviz.paths import DATA_DIR
from persviz.prompts import load_prompt_set
from persviz.shapesworld.concepts import contextual_probes, reference_signature
from persviz.tea.plots import impact_curves, norm_ratio_curve, shift_grid
from persviz.tea.study import impacts_over_steps, personalized, score_images, tea_rows
from persviz.tea.tracker import to_shift_grid, track_semantic_shift
from persviz.trainers import METHODS, list_snapshots, load_snapshot_embedding

STUDY_DIR = "study"
PAPER_GENERATION = {"steps": 50, "guidance": 7.0}  # the TEA paper's sampling (DPM-Solver++ set by the setup)
SHAPESWORLD_GENERATION = {"steps": 25, "guidance": 4.0}


@dataclass
class StudySettings:
    """What the study generates: probes, images per probe, snapshot spacing, sampler steps, guidance, batch."""

    n_probes: int = 12
    repeats: int = 1
    every: int = 500
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 8
    seed: int = 0

    def generation(self, shapesworld: bool) -> dict[str, Any]:
        base = SHAPESWORLD_GENERATION if shapesworld else PAPER_GENERATION
        return {"steps": self.steps or base["steps"], "guidance": self.guidance or base["guidance"],
                "batch_size": self.batch_size}


def full_scale_probes(class_word: str, n: int = 12) -> list[dict]:
    """Contextual probes for SD 1.5: the TEA paper's CustomConcept101 prompts of the class when it has them
    (``'{} barn in snowy ice'`` becomes ``'{} in snowy ice'``, so the slot takes '<v*>', 'sks barn' or 'barn'),
    else the shipped SD 1.5 contextual set."""
    parts = json.loads((DATA_DIR / "prompts" / "tea_eval_parts.json").read_text())["customconcept101"]
    if class_word in parts:
        probes = [{"template": p["prompt"].replace("{} " + class_word, "{}"), "context": {},
                   "context_text": p["context_part"]} for p in parts[class_word]]
    else:
        probes = [{"template": t, "context": {}, "context_text": t.replace("a {} ", "", 1).replace("{}", "").strip()}
                  for t in load_prompt_set("sd15_contextual")]
    return probes[:n]


def probes_for(concept: Concept, n: int, seed: int = 0) -> list[dict]:
    """ShapesWorld's grammar probes (oracle-readable contexts) or the SD 1.5 ones, by the concept's model."""
    if concept.model == SHAPESWORLD:
        return contextual_probes(concept.class_word, n=n, seed=seed)
    return full_scale_probes(concept.class_word, n)


def shift_sets(concept: Concept) -> tuple[str, str]:
    """The prompt sets of the semantic-shift metrics at the concept's scale."""
    return ("shapesworld_contextual", "shapesworld_simple") if concept.model == SHAPESWORLD else (
        "sd15_contextual", "sd15_simple")


def snapshots(run_dir: Path, every: int, init: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(0, class-word row) then (step, V*) every `every` steps, and always the last snapshot."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise FileNotFoundError(f"no Textual Inversion snapshots in {run_dir}; train with `persviz train ti`")
    keep = [(k, p) for k, p in snaps if k % every == 0]
    if not keep or keep[-1][0] != snaps[-1][0]:
        keep.append(snaps[-1])
    return [(0, init)] + [(k, load_snapshot_embedding(p).reshape(-1)) for k, p in keep]


def study_concept(folder: Any, pipe: Any, clip: Any, dino: Any = None, oracle: Any = None,
                  settings: StudySettings | None = None, methods: Sequence[str] | None = None,
                  progress: bool = True) -> dict:
    """Run the study of a concept folder on `pipe` (the concept's model) and write study/study.json and figures.

    oracle: ShapesWorld's attribute oracle (its columns only on ShapesWorld; None elsewhere). methods: the runs
    to put in the TEA table (default: every run the folder has)."""
    concept = read_concept(folder)
    settings = settings or StudySettings()
    shapesworld = concept.model == SHAPESWORLD
    if oracle is not None and not shapesworld:
        raise ValueError("the oracle reads ShapesWorld scenes only; pass oracle=None for this concept")
    gen = settings.generation(shapesworld)
    refs = concept.reference_images()
    probes = probes_for(concept, settings.n_probes, settings.seed)
    signature = reference_signature(oracle, refs) if oracle is not None else None
    out: dict[str, Any] = {"concept": concept.to_json(), "settings": {**asdict(settings), **gen},
                           "judges": {"oracle": oracle is not None}}

    def score(images: np.ndarray) -> dict:
        return score_images(images, probes, concept.class_word, refs, clip, dino, oracle, signature, settings.repeats)

    if "textual_inversion" in concept.runs:
        run = concept.run_dir("textual_inversion")
        contextual, simple = shift_sets(concept)
        out["text"] = track_semantic_shift(pipe, run, contextual, simple, class_word=concept.class_word,
                                           placeholder=concept.token("textual_inversion"), progress=progress)
        init = pipe.text_encoder.get_input_embeddings().weight[token_row(pipe, concept.class_word)].detach().clone()
        out["images"] = impacts_over_steps(pipe, snapshots(run, settings.every, init), concept.placeholder,
                                           concept.class_word, probes, refs, clip, dino, oracle, signature,
                                           settings.repeats, settings.seed, progress=progress, **gen)
    table: dict[str, dict] = {}
    for method in methods or [m for m in METHODS if m in concept.runs]:
        token = concept.token(method)
        word = token if method == "textual_inversion" else f"{token} {concept.class_word}"
        base_encoder = copy.deepcopy(pipe.text_encoder) if method == "dreambooth" else None
        with personalized(pipe, method, concept.run_dir(method)):
            rows = tea_rows(pipe, method, word, token, concept.class_word, probes, score, settings.repeats,
                            settings.seed, **gen)
            if base_encoder is not None:
                rows.update({f"{k} base anchor": v for k, v in tea_rows(
                    pipe, method, word, token, concept.class_word, probes, score, settings.repeats, settings.seed,
                    anchor_encoder=base_encoder, **gen).items() if k != "none"})
        for label, scores in rows.items():
            table[f"{method} {label}".replace(" none", "")] = scores
    out["tea_table"] = table
    study_dir = Path(concept.folder) / STUDY_DIR
    write_json(study_dir / "study.json", out)
    out["figures"] = [str(p) for p in write_figures(out, study_dir)]
    return out


def write_figures(study: Mapping, folder: Path) -> list[Path]:
    """The study's figures as PNG: |V*|/|c| and cos over steps, the shift grid, the impact curves."""
    written = []

    def save(fig: Any, name: str) -> None:
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    text = study.get("text")
    if text:
        save(norm_ratio_curve(text["step"], text["norm_ratio"], text["cosine"]), "norm_ratio")
        steps, grid = to_shift_grid(text)
        save(shift_grid(steps, grid), "shift_grid")
    images = study.get("images")
    if images:
        keys = [k for k in ("clip_t_concept", "clip_t_context", "clip_i") if k in images]
        save(impact_curves(images["step"], {k: images[k] for k in keys}), "impacts")
    return written


__all__ = ["PAPER_GENERATION", "STUDY_DIR", "StudySettings", "full_scale_probes", "probes_for", "shift_sets",
           "study_concept", "write_figures"]

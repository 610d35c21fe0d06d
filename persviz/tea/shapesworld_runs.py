"""Personalize the ShapesWorld micro-SD on the shipped concepts and ship the runs (embeddings / adapters, snapshots).

    persviz tea runs --methods textual_inversion --concepts checkers,candy,spark

Runs go to the concept folders data/shapesworld/concepts/<concept>/<method>/ (concept.json beside them; the format
of `persviz train`) in the formats the trainers write (diffusers
learned_embeds every 100 steps for Textual Inversion). Each run resumes where it stopped.

Settings follow the TEA paper's (docs/tea.md §8) except where the micro-SD needs otherwise, as stated:
Textual Inversion uses lr 1e-3 (the paper: 5e-4) for 3000 steps, batch 1, so that the drift the paper sees on
SD 1.5 happens inside the same 3000 steps on 128-d rows; templates come from the ShapesWorld caption grammar,
since the CLIP here knows only its world's words.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from persviz.embeddings import token_row
from persviz.loading import load_evaluator
from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR, eval_prompts, get_concept, load_references, oracle_signature
from persviz.tea.study import impacts_over_steps, personalized, score_images, tea_rows
from persviz.tea.tracker import save_json, track_semantic_shift
from persviz.trainers import (METHODS, list_snapshots, load_snapshot_embedding, train_custom_diffusion,
                              train_dreambooth_lora, train_textual_inversion)
from persviz.trainers.recipes import DREAMBOOTH_IDENTIFIER, recipe

RUNS_DIR = CONCEPTS_DIR  # one concept folder per shipped concept: concept.json, images/, one run folder per method


def placeholder(name: str) -> str:
    """The learned token of a concept: '<checkers>'."""
    return f"<{get_concept(name).name}>"


def run_dir(method: str, name: str, root: Path = RUNS_DIR) -> Path:
    """Where a shipped run lives."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return Path(root) / get_concept(name).name / method


def textual_inversion_config(name: str, steps: int = 3000):
    """The Textual Inversion settings of the shipped runs: ShapesWorld's recipe (persviz.trainers.recipes)."""
    return recipe("textual_inversion", placeholder(name), get_concept(name).class_word, shapesworld=True, steps=steps)


def run_textual_inversion(pipe, name: str, steps: int = 3000, root: Path = RUNS_DIR):
    """Train (or resume) the concept's Textual Inversion run; the pipeline is left unchanged."""
    return train_textual_inversion(pipe, load_references(name), textual_inversion_config(name, steps), run_dir("textual_inversion", name, root),
                                   load_result=False)


def dreambooth_config(name: str, steps: int = 800):
    """DreamBooth-LoRA settings of the shipped runs: ShapesWorld's recipe, the paper's but lr 1e-3 (at 1e-4 the
    micro-SD's LoRA learned the concepts too little to measure: mean CLIP-I 28.9, the class word's level, against
    47.6 for Custom Diffusion)."""
    return recipe("dreambooth", DREAMBOOTH_IDENTIFIER, get_concept(name).class_word, shapesworld=True, steps=steps)


def run_dreambooth(pipe, name: str, steps: int = 800, root: Path = RUNS_DIR):
    """Train (or resume) the concept's DreamBooth-LoRA run; the pipeline is left unchanged."""
    return train_dreambooth_lora(pipe, load_references(name), dreambooth_config(name, steps), run_dir("dreambooth", name, root),
                                 load_result=False)


def custom_diffusion_config(name: str, steps: int = 1000):
    """Custom Diffusion settings of the shipped runs: ShapesWorld's recipe (K/V of cross-attention and a modifier
    token; lr 1e-4, since the paper's 5e-6 leaves the micro-SD's small projections all but unchanged in 2000
    steps; no resize augmentation, whose masked loss has almost no interior on 16x16 latents)."""
    return recipe("custom_diffusion", f"<{name}-cd>", get_concept(name).class_word, shapesworld=True, steps=steps)


def run_custom_diffusion(pipe, name: str, steps: int = 1000, root: Path = RUNS_DIR):
    """Train (or resume) the concept's Custom Diffusion run; the pipeline is left unchanged."""
    return train_custom_diffusion(pipe, load_references(name), custom_diffusion_config(name, steps), run_dir("custom_diffusion", name, root),
                                  load_result=False)


RUNNERS = {"textual_inversion": run_textual_inversion, "dreambooth": run_dreambooth,
           "custom_diffusion": run_custom_diffusion}


def snapshots(method_dir: Path, every: int = 100, with_init: Optional[torch.Tensor] = None) -> list[tuple[int, torch.Tensor]]:
    """(step, V*) of a Textual Inversion run at every `every` steps; with_init prepends (0, initial row)."""
    snaps = [(k, load_snapshot_embedding(p).reshape(-1)) for k, p in list_snapshots(method_dir) if k % every == 0]
    if not snaps:
        raise FileNotFoundError(f"no snapshots in {method_dir}; train with `persviz tea runs`")
    return ([(0, with_init)] if with_init is not None else []) + snaps


def evaluators() -> dict:
    """The ShapesWorld judges: CLIP, DINO and the oracle."""
    return {"clip": load_evaluator(kind="clip"), "dino": load_evaluator(kind="dino"), "oracle": load_evaluator(kind="oracle")}


def study_textual_inversion(pipe, name: str, judges: dict, every: int = 300, n_probes: int = 24, repeats: int = 2,
             root: Path = RUNS_DIR) -> dict:
    """The semantic-collapse study of one TI run: text-space shift (every snapshot) and image-space impacts
    (every `every` steps and the initial class-word row); written to the run folder as study.json."""
    c, run = get_concept(name), run_dir("textual_inversion", name, root)
    text = track_semantic_shift(pipe, run, "shapesworld_contextual", "shapesworld_simple")
    init = pipe.text_encoder.get_input_embeddings().weight[token_row(pipe, c.class_word)].detach().clone()
    images = impacts_over_steps(pipe, snapshots(run, every, init), placeholder(name), c.class_word,
                                eval_prompts(name, n_probes), load_references(name), judges["clip"], judges["dino"],
                                judges["oracle"], oracle_signature(judges["oracle"], name), repeats=repeats)
    out = {"concept": name, "text": text, "images": images,
           "settings": {"every": every, "probes": n_probes, "repeats": repeats}}
    save_json(out, run / "study.json")
    return out


def method_word(method: str, name: str) -> tuple[str, str]:
    """(what fills a probe's slot, the token TEA adjusts) for a concept's run of a method."""
    cw = get_concept(name).class_word
    return {"textual_inversion": (placeholder(name), placeholder(name)), "dreambooth": (f"sks {cw}", "sks"),
            "custom_diffusion": (f"<{name}-cd> {cw}", f"<{name}-cd>")}[method]


def run_tea_rows(pipe, method: str, name: str, probes, score, repeats: int = 1, seed: int = 0,
                 root: Path = RUNS_DIR) -> dict:
    """tea_rows of a concept's final run of a method, loaded for the call (a TI token already in pipe is used as is)."""
    word, token = method_word(method, name)
    ready = method == "textual_inversion" and placeholder(name) in pipe.tokenizer.get_added_vocab()
    with contextlib.nullcontext() if ready else personalized(pipe, method, run_dir(method, name, root)):
        return tea_rows(pipe, method, word, token, get_concept(name).class_word, probes, score, repeats, seed)


def tea_table(pipe, judges: dict, methods: tuple = METHODS, n_probes: int = 12, repeats: int = 2, seed: int = 1,
              root: Path = RUNS_DIR, write: bool = True) -> dict:
    """Table 6 on ShapesWorld: every concept's final run of each method without and with TEA (default knobs);
    scores averaged over concepts, per concept kept too; written to concepts/tea_table.json."""
    per: dict = {}
    for method in methods:
        for name in CONCEPTS:
            c, refs = get_concept(name), load_references(name)
            probes = eval_prompts(name, n_probes, seed=seed)
            sig = oracle_signature(judges["oracle"], name)

            def score(images):
                return score_images(images, probes, c.class_word, refs, judges["clip"], judges["dino"],
                                    judges["oracle"], sig, repeats)
            rows = run_tea_rows(pipe, method, name, probes, score, repeats, seed=1000, root=root)
            for label, scores in rows.items():
                per.setdefault(f"{method} {label}".replace(" none", ""), {})[name] = scores
    mean = {row: {k: float(np.mean([v[k] for v in by.values()])) for k in next(iter(by.values()))}
            for row, by in per.items()}
    out = {"mean": mean, "per_concept": per, "settings": {"probes": n_probes, "repeats": repeats, "seed": seed}}
    if write:
        save_json(out, root / "tea_table.json")
    return out

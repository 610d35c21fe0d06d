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
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from persviz.families import text_stack
from persviz.methods import get_method
from persviz.constants import CLASS_WORD_ROW
from persviz.evaluation import Evaluation, combine, evaluate, format_intervals
from persviz.io import atomic_write, write_json
from persviz.loading import load_evaluator
from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld.concepts import (CONCEPTS, CONCEPTS_DIR, SHIPPED_RECIPES, eval_prompts, get_concept,
                                          load_references, oracle_signature)
from persviz.stats import N_BOOT, Difference, Interval
from persviz.tea.study import (adaptive_images, adaptive_vs_fixed, generate_probes, impacts_over_steps, personalized,
                               rows_summary, tea_rows)
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


def shipped_recipe(method: str, name: str) -> dict:
    """The shipped run's learning rate and steps for a concept (concepts.SHIPPED_RECIPES: the world search's
    per-concept choice, docs/world.md §6)."""
    return dict(SHIPPED_RECIPES[get_concept(name).name][method])


def _config(method: str, token: str, name: str, steps: Optional[int]):
    r = shipped_recipe(method, name)
    return recipe(method, token, get_concept(name).class_word, shapesworld=True, lr=r["lr"],
                  steps=r["steps"] if steps is None else steps)


def textual_inversion_config(name: str, steps: Optional[int] = None):
    """The Textual Inversion settings of a shipped run: ShapesWorld's recipe (persviz.methods) with the concept's
    shipped lr and steps."""
    return _config("textual_inversion", placeholder(name), name, steps)


def run_textual_inversion(pipe, name: str, steps: Optional[int] = None, root: Path = RUNS_DIR):
    """Train (or resume) the concept's Textual Inversion run; the pipeline is left unchanged."""
    return train_textual_inversion(pipe, load_references(name), textual_inversion_config(name, steps),
                                   run_dir("textual_inversion", name, root), load_result=False)


def dreambooth_config(name: str, steps: Optional[int] = None):
    """DreamBooth-LoRA settings of a shipped run: ShapesWorld's recipe with the concept's shipped lr and steps (the
    paper's 1e-4 left the micro-SD's LoRA at the class word's level)."""
    return _config("dreambooth", DREAMBOOTH_IDENTIFIER, name, steps)


def run_dreambooth(pipe, name: str, steps: Optional[int] = None, root: Path = RUNS_DIR):
    """Train (or resume) the concept's DreamBooth-LoRA run; the pipeline is left unchanged."""
    return train_dreambooth_lora(pipe, load_references(name), dreambooth_config(name, steps),
                                 run_dir("dreambooth", name, root), load_result=False)


def custom_diffusion_config(name: str, steps: Optional[int] = None):
    """Custom Diffusion settings of a shipped run: ShapesWorld's recipe (K/V of cross-attention and a modifier
    token, no resize augmentation, whose masked loss has almost no interior on 16x16 latents) with the concept's
    shipped lr and steps (the paper's 5e-6 leaves the micro-SD's small projections all but unchanged)."""
    return _config("custom_diffusion", f"<{name}-cd>", name, steps)


def run_custom_diffusion(pipe, name: str, steps: Optional[int] = None, root: Path = RUNS_DIR):
    """Train (or resume) the concept's Custom Diffusion run; the pipeline is left unchanged."""
    return train_custom_diffusion(pipe, load_references(name), custom_diffusion_config(name, steps),
                                  run_dir("custom_diffusion", name, root), load_result=False)


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
    init = text_stack(pipe).primary.word_row(c.class_word)
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
    ready = get_method(method).row_snapshots and text_stack(pipe).primary.has_added(placeholder(name))
    with contextlib.nullcontext() if ready else personalized(pipe, method, run_dir(method, name, root)):
        return tea_rows(pipe, method, word, token, get_concept(name).class_word, probes, score, repeats, seed)


def cached_rows(work: Optional[Path], name: str, part: str, make) -> dict[str, np.ndarray]:
    """make() -> {row: images}, kept as work/<name>/<part>.npz (written atomically) and read back on a later call."""
    if work is None:
        return make()
    path = Path(work) / name / f"{part.replace(' ', '_')}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **out)
    atomic_write(path, save)
    return out


def tea_table(pipe, judges: dict, methods: tuple = METHODS, n_probes: int = 24, repeats: int = 2, seed: int = 1,
              root: Path = RUNS_DIR, write: bool = True, progress: bool = True, work: Optional[Path] = None) -> dict:
    """Table 6 on ShapesWorld with the evaluation protocol: every concept's final run of each method without and
    with TEA (default knobs), and the base model with the class word on the same probes and seeds; per-image scores
    kept; means with nested bootstrap intervals over the (concept,
    prompt) units, and each method's with-TEA minus without-TEA differences with intervals and Wilcoxon p-values,
    Holm-corrected across the metrics. Written to concepts/tea_table.json (read it with read_tea_table). With
    `work`, each concept's images of each method (and of the class word) are kept there and a later call resumes
    from them (the same seeds give the same images)."""
    evaluations = {}
    names = list(CONCEPTS)
    for name in tqdm(names, desc="TEA table", disable=not progress):
        c, refs = get_concept(name), load_references(name)
        probes = eval_prompts(name, n_probes, seed=seed)
        sig = oracle_signature(judges["oracle"], name)
        # the base model with the class word, on the same probes and seeds: what personalization changed (finding iii)
        images = cached_rows(work, name, CLASS_WORD_ROW, lambda: {CLASS_WORD_ROW: generate_probes(
            pipe, probes, c.class_word, repeats, seed=GENERATION_SEED)})
        for method in methods:
            def rows(method: str = method) -> dict[str, np.ndarray]:
                got = run_tea_rows(pipe, method, name, probes, lambda ims: ims, repeats, seed=GENERATION_SEED,
                                   root=root)
                return {f"{method} {label}".replace(" none", ""): ims for label, ims in got.items()}
            images.update(cached_rows(work, name, method, rows))
        n = len(probes) * repeats
        evaluations[name] = evaluate(images, probes, c.class_word, refs, judges["clip"], judges["dino"],
                                     judges["oracle"], sig, repeats, seeds=[GENERATION_SEED + i for i in range(n)],
                                     concept=name, scale="shapesworld")
    out = summarize_tea_table(evaluations, {"probes": n_probes, "repeats": repeats, "seed": seed,
                                            "generation_seed": GENERATION_SEED})
    if write:
        write_json(root / "tea_table.json", out)
    return out



GENERATION_SEED = 1000  # image i of a row is seeded 1000 + i (probe-major), the same in every row
HELD_OUT_SEED = 2000  # adaptive TEA is scored on other seeds than those its rotation was chosen on


def summarize_tea_table(evaluations: dict, settings: dict, n_boot: int = N_BOOT) -> dict:
    """tea_table.json's content from per-concept Evaluations: 'mean' and 'per_concept' (means, as before),
    'intervals' (over the concepts' prompts together), 'differences' (each method's TEA rows minus its untouched
    row), 'evaluations' (the per-image scores) and the settings."""
    both = combine(evaluations)
    summary = rows_summary(both, n_boot=n_boot)
    if CLASS_WORD_ROW in both.conditions:  # each method's untouched run against the base model with the class word
        runs = [r for r in both.conditions if r != CLASS_WORD_ROW and " " not in r]
        summary["differences"].update(rows_summary(both, [(CLASS_WORD_ROW, r) for r in runs],
                                                   n_boot=n_boot)["differences"])
    per = {row: {name: {m: float(np.mean(ev.items[row][m])) for m in ev.metrics(row)}
                 for name, ev in evaluations.items()} for row in both.conditions}
    return {"format": "persviz tea table 2", "settings": settings, "meta": both.meta,
            **summary, "per_concept": per,
            "evaluations": {name: ev.to_json() for name, ev in evaluations.items()}}


def read_tea_table(path: Path = RUNS_DIR / "tea_table.json") -> dict:
    """tea_table.json with its per-image scores as Evaluations ('evaluations': {concept: Evaluation})."""
    d = json.loads(Path(path).read_text())
    if "evaluations" not in d:
        raise ValueError(f"{path} is a table of means only (written before the evaluation protocol); rewrite it "
                         f"with `persviz tea evaluate`")
    d["evaluations"] = {k: Evaluation.from_json(v) for k, v in d["evaluations"].items()}
    return d


def adaptive_table(pipe, judges: dict, n_probes: int = 8, n_images: int = 4, seed: int = 1,
                   root: Path = RUNS_DIR, write: bool = True, progress: bool = True) -> dict:
    """Adaptive against fixed TEA on the three concepts' Textual Inversion runs (n_probes prompts each, n_images
    seeds per prompt): the rotation chosen per prompt (adaptive_vs_fixed, on seeds 1000...), then the untouched
    token, the fixed knobs and the adaptive choice generated on held-out seeds (2000...: the choice is not scored
    on the images it was made on) and scored per image with the protocol.
    Written to concepts/adaptive_tea.json: the per-prompt choices, intervals and the paired differences."""
    evaluations, choices = {}, {}
    for name in tqdm(list(CONCEPTS), desc="adaptive TEA", disable=not progress):
        c, refs, ph = get_concept(name), load_references(name), placeholder(name)
        probes = eval_prompts(name, n_probes, seed=seed)
        with personalized(pipe, "textual_inversion", run_dir("textual_inversion", name, root)):
            rows = adaptive_vs_fixed(pipe, probes, ph, c.class_word, refs, judges["clip"], n_images=n_images,
                                     seed=GENERATION_SEED, progress=False)
            images = adaptive_images(pipe, probes, ph, c.class_word, [r["rotation"] for r in rows],
                                     n_images=n_images, seed=HELD_OUT_SEED)
        choices[name] = [{k: r[k] for k in ("prompt", "rotation", "status", "tried", "target")} for r in rows]
        evaluations[name] = evaluate(images, probes, c.class_word, refs, judges["clip"], judges["dino"],
                                     judges["oracle"], oracle_signature(judges["oracle"], name), n_images,
                                     seeds=[HELD_OUT_SEED + i for _ in probes for i in range(n_images)],
                                     concept=name)
    both = combine(evaluations)
    out = {"format": "persviz adaptive tea 1",
           "settings": {"probes": n_probes, "images_per_prompt": n_images, "seed": seed, "fixed": [0.2, 0.5],
                        "chosen_on_seeds": GENERATION_SEED, "scored_on_seeds": HELD_OUT_SEED},
           "meta": both.meta, "choices": choices,
           **rows_summary(both, [("untouched", "fixed"), ("untouched", "adaptive"), ("fixed", "adaptive")]),
           "evaluations": {k: v.to_json() for k, v in evaluations.items()}}
    if write:
        write_json(root / "adaptive_tea.json", out)
    return out


def tea_table_rows(saved: dict, metrics: Optional[list] = None, digits: int = 3) -> tuple[dict, dict]:
    """What a saved tea_table.json (or adaptive_tea.json) shows: ({row: {metric: 'mean [low, high]', 'n': ...}},
    {comparison: {metric: Difference}}) from its 'intervals' and 'differences'."""
    if "intervals" not in saved:
        raise ValueError("this table has means only (written before the evaluation protocol); rewrite it with "
                         "`persviz tea evaluate`")
    rows = {row: format_intervals({m: Interval(**v) for m, v in by.items() if metrics is None or m in metrics}, digits)
            for row, by in saved["intervals"].items()}
    diffs = {k: {m: Difference(**v) for m, v in by.items() if metrics is None or m in metrics}
             for k, by in saved["differences"].items()}
    return rows, diffs

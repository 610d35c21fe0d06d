"""The TEA study of one concept folder: what ``persviz study CONCEPT_DIR`` writes and notebooks 01-02 show.

1. the semantic-shift tracker over the Textual Inversion snapshots (text space: |V*|/|c|, cos(V*, c), the four
   distances), 2. the two-way impacts over training (image space: CLIP-T concept/context, CLIP-I, DINO-I, and the
   oracle on ShapesWorld), 3. the with/without-TEA table of every trained method (DreamBooth: prompt-level TEA,
   aligned and unaligned, anchored on the fine-tuned and on the base text encoder).
Written to ``CONCEPT_DIR/study/study.json`` with its figures beside it.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from persviz.families.base import Pipeline
from persviz.families import text_stack
from persviz.methods import get_method, tracked_method
from persviz.concept_folder import Concept, read_concept
from persviz.embeddings import load_learned_token
from persviz.evaluation import Evaluation, describe_evaluator, evaluation_meta, probe_keys, score_per_image
from persviz.io import atomic_write, confined, write_json
from persviz.loading import is_embedded
from persviz.paths import DATA_DIR
from persviz.prompts import load_prompt_set
from persviz.shards import cell, run_cells
from persviz.shapesworld.concepts import CONCEPTS, contextual_probes, reference_signature
from persviz.tea.plots import impact_curves, norm_ratio_curve, shift_grid
from persviz.tea.study import dominance_over_steps, impacts_over_steps, personalized, rows_summary, tea_rows
from persviz.tea.tracker import to_shift_grid, track_semantic_shift
from persviz.embedding_files import read_embedding_file
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
    """ShapesWorld's grammar probes (oracle-readable contexts; a shipped concept's avoid its references'
    backgrounds, as persviz.shapesworld.concepts.eval_prompts) or the SD 1.5 ones, by the concept's model."""
    if is_embedded(concept.model):
        shipped = CONCEPTS.get(concept.name)
        avoid = shipped.backgrounds if shipped is not None and shipped.class_word == concept.class_word else ()
        return contextual_probes(concept.class_word, avoid, n=n, seed=seed)
    return full_scale_probes(concept.class_word, n)


def reference_grid(concepts: Sequence[Concept]) -> tuple[np.ndarray, int]:
    """The concepts' reference images for one image grid, a row each: as many per concept as the one with fewest
    has, resized to the first concept's size where they differ; (images [rows * cols, H, W, 3], cols)."""
    refs = [c.reference_images() for c in concepts]
    cols, (h, w) = min(len(r) for r in refs), refs[0].shape[1:3]
    rows = [r[:cols] if r.shape[1:3] == (h, w) else
            np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BICUBIC)) for x in r[:cols]]) for r in refs]
    return np.concatenate(rows), cols


def probe_label(probe: Mapping) -> str:
    """A short label of a probe's context for an image grid: ShapesWorld's 'left, by blue circle\non white', else
    the probe's context text."""
    ctx = probe.get("context") or {}
    if "background" not in ctx:
        return probe["context_text"]
    second = f"{ctx['position']}, by {' '.join(ctx['second'])}\n" if "second" in ctx else ""
    return f"{second}on {ctx['background']}"


def shift_sets(concept: Concept) -> tuple[str, str]:
    """The prompt sets of the semantic-shift metrics at the concept's scale."""
    return ("shapesworld_contextual", "shapesworld_simple") if is_embedded(concept.model) else (
        "sd15_contextual", "sd15_simple")


def _norms(v: Any) -> Any:
    """|V*| of a snapshot, rounded: a number, or {encoder name: number} for a row per encoder (SDXL)."""
    if isinstance(v, Mapping):
        return {n: round(float(r.norm()), 6) for n, r in v.items()}
    return round(float(v.norm()), 6)


def snapshot_rows(path: Path) -> Any:
    """A saved V*, float32, flattened: [D] (or [n * D]); a file of one part per text encoder (SDXL's clip_l +
    clip_g) as {encoder name: [D_e]}, what ``learned_embedding`` and the tracker take for such a model."""
    f = read_embedding_file(path)
    if f.per_encoder:
        return {name: rows.float().reshape(-1) for name, rows in f.parts.items()}
    return load_snapshot_embedding(path).reshape(-1)


def snapshots(run_dir: Path, every: int, init: Any) -> list[tuple[int, Any]]:
    """(0, class-word row) then (step, V*) every `every` steps, and always the last snapshot (init None: no step 0);
    each V* as ``snapshot_rows`` reads it (SDXL: {encoder name: row})."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise FileNotFoundError(f"no Textual Inversion snapshots in {run_dir}; train with `persviz train ti`")
    keep = [(k, p) for k, p in snaps if k % every == 0]
    if not keep or keep[-1][0] != snaps[-1][0]:
        keep.append(snaps[-1])
    return ([(0, init)] if init is not None else []) + [(k, snapshot_rows(p)) for k, p in keep]


def spaced_snapshots(run_dir: Path, n: int, init: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor]]:
    """snapshots() about `n` apart over the run: every max(1, last step // n) steps (a 3000-step run, n=30: every
    100), whatever length the run has."""
    snaps = list_snapshots(run_dir)
    last = snaps[-1][0] if snaps else 0
    return snapshots(run_dir, max(1, last // max(1, n)), init)


def at_fractions(snaps: Sequence[tuple[int, Any]], fractions: Sequence[float]) -> list[tuple[int, Any]]:
    """The snapshots nearest to each fraction of the last step (0, 1/3, 1 of a 3000-step run: 0, 1000, 3000), each
    once, in step order."""
    if not snaps:
        raise ValueError("no snapshots to pick from")
    last = snaps[-1][0]
    picked = {min(range(len(snaps)), key=lambda i: abs(snaps[i][0] - f * last)) for f in fractions}
    return [snaps[i] for i in sorted(picked)]


def final_embedding(concept: Concept) -> Any:
    """The last saved V* of the concept's Textual Inversion run, [D] (SDXL: {encoder name: [D_e]})."""
    snaps = list_snapshots(concept.run_dir("textual_inversion"))
    if not snaps:
        raise FileNotFoundError(f"no Textual Inversion snapshots in {concept.run_dir('textual_inversion')}")
    return snapshot_rows(snaps[-1][1])


def class_row(pipe: Pipeline, concept: Concept) -> Any:
    """The input-embedding row of the concept's class word (V*'s starting point), a detached copy [D]; a model of
    several text encoders (SDXL): {encoder name: its own class-word row}, the layout of ``snapshot_rows``."""
    stack = text_stack(pipe)
    if len(stack) > 1:
        return {e.name: e.word_row(concept.class_word) for e in stack}
    return stack.primary.word_row(concept.class_word)


def norm_panels(pipe: Pipeline, snaps: Sequence[tuple[int, Any]], c_row: Any) -> list[tuple[str, torch.Tensor, dict,
                                                                                               float]]:
    """Fig. 4 per text encoder: (encoder name, the norms of all its vocabulary rows [V], {step: |V*|}, |c|), each
    against its own vocabulary and class-word row (SDXL: clip_l then clip_g; SD 1.x: one, named ''). snaps and
    c_row as ``snapshots`` and ``class_row`` give them."""
    stack = text_stack(pipe)
    several = isinstance(c_row, Mapping)
    out = []
    for e in stack:
        pick = (lambda v, n=e.name: v[n]) if several else (lambda v: v)  # noqa: E731
        out.append((e.name if several else "", e.rows.detach().float().norm(dim=-1).cpu(),
                    {s: float(pick(v).norm()) for s, v in snaps}, float(pick(c_row).norm())))
    return out


def dominance(pipe: Pipeline, fixed: Concept, varied: Concept, clip: Any, fractions: Sequence[float], n_images: int = 8,
              seed: int = 0, progress: bool = True, **generation: Any) -> dict[str, list]:
    """Multi-concept collapse of two concept folders (Fig. 5): 'a <fixed> next to a <varied>', `fixed` at its final
    V*, `varied` from its class word along its run (the snapshots at `fractions` of its last step); CLIP-I to each
    concept's first reference image (dominance_over_steps; keys 'clip_i_<token>')."""
    a, b = fixed.token("textual_inversion"), varied.token("textual_inversion")
    if a == b:
        raise ValueError(f"both concepts learned the token {a!r}; the multi-concept prompt needs two different ones")
    snaps = at_fractions(snapshots(varied.run_dir("textual_inversion"), 1, class_row(pipe, varied)), fractions)
    template = f"a {{{a.strip('<>')}}} next to a {{{b.strip('<>')}}}"
    anchors = {a: fixed.reference_images()[:1], b: varied.reference_images()[:1]}
    return dominance_over_steps(pipe, (a, final_embedding(fixed)), (b, snaps), template, anchors, clip,
                                n_images=n_images, seed=seed, progress=progress, **generation)


@contextlib.contextmanager
def set_aside(pipe: Pipeline, token: str) -> Iterator[None]:
    """Inside the block `token` is not in the tokenizer (a learned token already loaded is unloaded, so a run of the
    same token can load); its row is loaded back on exit. Nothing happens for a token not loaded."""
    loaded = [e for e in text_stack(pipe) if e.has_added(token)]  # each encoder that holds it (SDXL: both)
    rows = [e.word_row(token) for e in loaded]
    for e in loaded:
        pipe.unload_textual_inversion(token, tokenizer=e.tokenizer, text_encoder=e.encoder)
    try:
        yield
    finally:
        for e, row in zip(loaded, rows):
            load_learned_token(pipe, {token: row}, token=token, text=e)


def tea_table(pipe: Pipeline, concept: Concept, probes: Sequence[Mapping], score: Any,
              methods: Sequence[str] | None = None, repeats: int = 1, seed: int = 0,
              **generation: Any) -> dict[str, dict]:
    """The with/without-TEA rows of every run of the concept (or `methods`), each run loaded for the call (a learned
    token of the same name already in pipe is set aside meanwhile): 'textual_inversion', 'textual_inversion TEA',
    'dreambooth', 'dreambooth TEA', 'dreambooth TEA unaligned' (anchored on the fine-tuned text encoder, the paper)
    and the same two with ' base anchor' (anchored on the base text encoder), 'custom_diffusion', ... TEA."""
    table: dict[str, dict] = {}
    for method in methods or [m for m in METHODS if m in concept.runs]:
        token = concept.token(method)
        m = get_method(method)
        word = m.slot_word(token, concept.class_word)
        # the base text encoders (one per encoder of the family: SDXL's clip_l and clip_g), copied before the run loads
        base_encoder = [copy.deepcopy(e.encoder) for e in text_stack(pipe)] if m.tea_level == "prompt" else None
        with set_aside(pipe, token), personalized(pipe, method, concept.run_dir(method)):
            rows = tea_rows(pipe, method, word, token, concept.class_word, probes, score, repeats, seed, **generation)
            if base_encoder is not None:
                rows.update({f"{k} base anchor": v for k, v in tea_rows(
                    pipe, method, word, token, concept.class_word, probes, score, repeats, seed,
                    anchor_encoder=base_encoder, **generation).items() if k != "none"})
        for label, scores in rows.items():
            table[f"{method} {label}".replace(" none", "")] = scores
    return table


def study_cells(concept: Concept, n_snapshots: int, methods: Sequence[str] | None = None) -> list[dict]:
    """The study's parts as cells of persviz.shards: the tracker, each snapshot of the impacts, each method's TEA rows."""
    cells = []
    if tracked_method(concept.runs) is not None:
        cells.append(cell(part="text"))
        cells += [cell(part="impacts", snapshot=i) for i in range(n_snapshots)]
    return cells + [cell(part="tea", method=m) for m in methods or [m for m in METHODS if m in concept.runs]]


STUDY_CELLS = "per-image TEA rows"  # what a study cell holds; cells of another layout are recomputed


def tea_summary(per_image: Mapping[str, Mapping[str, list]], probes: Sequence[Mapping], settings: StudySettings,
                concept: Concept, refs: np.ndarray, judges: Sequence[Any], shapesworld: bool) -> dict:
    """study.json's TEA entries from per-image scores {row: {metric: [per image]}}: 'tea_table' (means, as
    before), 'tea_evaluation' (an Evaluation: every image's scores, prompt and seed), 'tea_intervals' (95 %
    nested bootstrap) and 'tea_differences' (each TEA row minus its method's untouched row, Wilcoxon + Holm)."""
    n = len(probes) * settings.repeats
    prompts = [k for k in probe_keys(probes) for _ in range(settings.repeats)]
    seeds = [settings.seed + i for i in range(n)]  # tea_rows seeds image i with seed + i
    items = {row: {"prompt": prompts, "seed": seeds, **scores} for row, scores in per_image.items()}
    ev = Evaluation(items, evaluation_meta(items, concept.name, concept.class_word,
                                           "shapesworld" if shapesworld else "full", None, refs, *judges))
    summary = rows_summary(ev)
    return {"tea_table": summary["mean"], "tea_evaluation": ev.to_json(), "tea_intervals": summary["intervals"],
            "tea_differences": summary["differences"]}


def study_concept(folder: Any, pipe: Pipeline, clip: Any, dino: Any = None, oracle: Any = None,
                  settings: StudySettings | None = None, methods: Sequence[str] | None = None,
                  progress: bool = True, state: Any = None) -> dict | None:
    """Run the study of a concept folder on `pipe` (the concept's model) and write study/study.json and figures.

    oracle: ShapesWorld's attribute oracle (its columns only on ShapesWorld; None elsewhere). methods: the runs
    to put in the TEA table (default: every run the folder has). The parts (tracker, each snapshot of the impacts,
    each method's TEA rows) are cells of persviz.shards, written to study/cells/ and sharded over the processes of
    `state` (accelerate's PartialState; default: this process alone): a killed study resumes with the missing
    parts, a study of other settings or snapshots starts over. Returns the study on the main process, None on the
    others. Every write stays inside the concept folder (persviz.io.confined): a study/ that is a link leading out
    is refused before anything is written."""
    concept = read_concept(folder)
    with confined(concept.folder):
        return _study_concept(concept, pipe, clip, dino, oracle, settings, methods, progress, state)


def _study_concept(concept: Concept, pipe: Pipeline, clip: Any, dino: Any, oracle: Any, settings: StudySettings | None,
                   methods: Sequence[str] | None, progress: bool, state: Any) -> dict | None:
    settings = settings or StudySettings()
    shapesworld = is_embedded(concept.model)
    if oracle is not None and not shapesworld:
        raise ValueError("the oracle reads ShapesWorld scenes only; pass oracle=None for this concept")
    gen = settings.generation(shapesworld)
    refs = concept.reference_images()
    probes = probes_for(concept, settings.n_probes, settings.seed)
    signature = reference_signature(oracle, refs) if oracle is not None else None
    out: dict[str, Any] = {"concept": concept.to_json(), "settings": {**asdict(settings), **gen},
                           "judges": {"oracle": oracle is not None}}

    def score(images: np.ndarray) -> dict:  # per image, so the TEA table gets intervals (docs/evaluation.md)
        scores = score_per_image(images, probes, concept.class_word, refs, clip, dino, oracle, signature,
                                 settings.repeats)
        return {k: [float(x) for x in v] for k, v in scores.items()}

    snaps = []
    tracked = tracked_method(concept.runs)
    if tracked is not None:
        run = concept.run_dir(tracked.name)
        snaps = snapshots(run, settings.every, class_row(pipe, concept))  # SDXL: a row per encoder
    methods = list(methods or [m for m in METHODS if m in concept.runs])
    cells = study_cells(concept, len(snaps), methods)

    def compute(c: dict) -> dict:
        if c["part"] == "text":
            contextual, simple = shift_sets(concept)
            return track_semantic_shift(pipe, run, contextual, simple, class_word=concept.class_word,
                                        placeholder=concept.token("textual_inversion"), progress=False)
        if c["part"] == "impacts":
            table = impacts_over_steps(pipe, [snaps[c["snapshot"]]], concept.placeholder, concept.class_word, probes,
                                       refs, clip, dino, oracle, signature, settings.repeats, settings.seed,
                                       progress=False, **gen)
            return {k: v[0] for k, v in table.items()}
        return tea_table(pipe, concept, probes, score, [c["method"]], settings.repeats, settings.seed, **gen)

    study_dir = Path(concept.folder) / STUDY_DIR
    grid = {**out["settings"], "methods": methods, "model": concept.model, "cells": STUDY_CELLS,
            "snapshots": [[int(k), _norms(v)] for k, v in snaps],
            "judges": [describe_evaluator(j) for j in (clip, dino, oracle)]}
    results = run_cells(cells, compute, study_dir, grid, state=state, progress=progress, desc="study",
                        on_mismatch="restart")
    if results is None:
        return None
    parts = [(c, results[c["id"]]) for c in cells]
    if tracked is not None:
        out["text"] = next(r for c, r in parts if c["part"] == "text")
        rows = [r for c, r in parts if c["part"] == "impacts"]
        out["images"] = {k: [r[k] for r in rows] for k in rows[0]}
    per_image = {k: v for c, r in parts if c["part"] == "tea" for k, v in r.items()}
    out.update(tea_summary(per_image, probes, settings, concept, refs, (clip, dino, oracle), shapesworld))
    write_json(study_dir / "study.json", out)
    out["figures"] = [str(p) for p in write_figures(out, study_dir)]
    return out


def saved_study_rows(concepts: Sequence[Concept], at: Sequence[int] = (0, None, -1)) -> tuple[list[dict], str]:
    """The image-space studies saved in concept folders, for a table: rows {'concept', 'step', scores...} at the
    first, middle and last saved step of each, and a title (what wrote them, with how many prompts x seeds), or
    no rows and a sentence saying how to write one. Read from CONCEPT/study/study.json (``persviz study``) or the
    Textual Inversion run's study.json (the shipped runs' training script)."""
    rows, title = [], None
    for concept in concepts:
        saved = saved_study(concept)
        if saved is None or not saved.get("images"):
            continue
        im = saved["images"]
        settings = saved.get("settings", {})
        n, r = settings.get("n_probes", settings.get("probes")), settings.get("repeats")
        title = title or f"the full-size study ({n} prompts x {r} seeds, written by {saved['written_by']})"
        for i in dict.fromkeys(len(im["step"]) // 2 if i is None else i % len(im["step"]) for i in at):
            rows.append({"concept": concept.name, **{k: v[i] for k, v in im.items()}})
    if not rows:
        names = ", ".join(str(c.folder) for c in concepts)
        return [], f"no saved study in {names}: `persviz study CONCEPT_DIR` writes one"
    return rows, title


def saved_study(concept: Concept) -> dict | None:
    """A concept folder's saved study with 'written_by': study/study.json, else its Textual Inversion run's
    study.json (the shipped runs); None when it has neither."""
    candidates = [(Path(concept.folder) / STUDY_DIR / "study.json", "persviz study")]
    tracked = tracked_method(concept.runs)
    if tracked is not None:
        candidates.append((concept.run_dir(tracked.name) / "study.json", "the training script"))
    for path, who in candidates:
        if path.is_file():
            return {**json.loads(path.read_text()), "written_by": who}
    return None


def saved_tea_table(concept: Concept) -> tuple[dict, str] | None:
    """The saved with/without-TEA table of a concept and its title: study/study.json's (``persviz study``), else,
    for a shipped ShapesWorld concept, the mean over the shipped concepts in tea_table.json beside the folders;
    None when there is neither."""
    saved = saved_study(concept)
    if saved is not None and saved.get("tea_table"):
        s = saved.get("settings", {})
        return saved["tea_table"], f"{concept.placeholder}, {s.get('n_probes')} prompts x {s.get('repeats')} seeds (persviz study)"
    shipped = Path(concept.folder).parent / "tea_table.json"
    if is_embedded(concept.model) and shipped.is_file():
        d = json.loads(shipped.read_text())
        names = next(iter(d["per_concept"].values()), {})
        if concept.name in names:
            words = {2: "two", 3: "three", 4: "four"}
            s = d["settings"]
            return d["mean"], (f"mean over the {words.get(len(names), len(names))} concepts, {s['probes']} prompts x "
                               f"{s['repeats']} seeds")
    return None


def write_figures(study: Mapping, folder: Path) -> list[Path]:
    """The study's figures as PNG: |V*|/|c| and cos over steps (one per text encoder where there are several:
    clip_l_norm_ratio.png, clip_g_norm_ratio.png), the shift grid, the impact curves."""
    written = []

    def save(fig: Any, name: str) -> None:
        path = atomic_write(folder / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                                            bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    text = study.get("text")
    if text:
        # one curve per text encoder, each against its own class-word row (SDXL: clip_l_norm_ratio, clip_g_...)
        for pre in [k[:-len("norm_ratio")] for k in text if k.endswith("norm_ratio")]:
            save(norm_ratio_curve(text["step"], text[f"{pre}norm_ratio"], text[f"{pre}cosine"]), f"{pre}norm_ratio")
        steps, grid = to_shift_grid(text)
        save(shift_grid(steps, grid), "shift_grid")
    images = study.get("images")
    if images:
        keys = [k for k in ("clip_t_concept", "clip_t_context", "clip_i") if k in images]
        save(impact_curves(images["step"], {k: images[k] for k in keys}), "impacts")
    return written


__all__ = ["PAPER_GENERATION", "STUDY_DIR", "StudySettings", "at_fractions", "class_row", "dominance", "final_embedding",
           "norm_panels", "snapshot_rows",
           "full_scale_probes", "reference_grid", "probe_label", "probes_for", "saved_study", "saved_study_rows", "saved_tea_table",
           "set_aside", "shift_sets", "snapshots", "spaced_snapshots", "study_cells", "study_concept", "tea_table", "write_figures"]

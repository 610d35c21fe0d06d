"""The TEA paper's image-space studies (Sec. 3.2.2, 3.3, 5) as functions: a learned token at any saved step,
its two-way impacts over training, multi-concept dominance, and the with/without-TEA table.

A "probe" is one contextual prompt of a concept: {'template': 'a {} on a black background', 'context': {...},
'context_text': 'on a black background'} (persviz.shapesworld.concepts.eval_prompts writes them; at full scale
build them from data/prompts/tea_eval_parts.json). The template's {} takes the placeholder to generate and the
class word for CLIP-T, so the scores never depend on the evaluator knowing the learned token.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from persviz.families.base import Pipeline
from persviz.families import text_stack
from persviz.methods import get_method
from persviz.embeddings import load_learned_token, token_row
from persviz.generation import GUIDANCE, STEPS, generate, generate_from_embeds
from persviz.evaluation import Evaluation, score_per_image
from persviz.metrics import clip_i
from persviz.stats import N_BOOT
from persviz.tea.adaptive import SCHEDULE, adaptive_tea, make_tea_scorer
from persviz.tea.pipeline import embeds_kwargs, encode_prompt_level, tea
from persviz.trainers import METHODS, load_custom_diffusion, load_dreambooth_lora, load_textual_inversion_run
from persviz.text_stack import PlaceholderRows

Probe = Mapping[str, Any]


@contextlib.contextmanager
def learned_embedding(pipe: Pipeline, placeholder: str, vector: Any) -> Iterator[None]:
    """Inside the block the pipeline's tokenizer knows `placeholder` with embedding `vector` [D]; restored on exit.
    A pipeline of several text encoders (SDXL) takes one row per encoder, {encoder name: [D_e]} (a snapshot of
    ``persviz.tea.concept_study.snapshots``), each loaded into its own encoder.

    A placeholder already loaded has its row written in place (PlaceholderRows.written, as tea() does); a new one is
    added with pipe.load_textual_inversion and removed again with pipe.unload_textual_inversion."""
    stack = text_stack(pipe)
    if isinstance(vector, Mapping):
        if sorted(vector) != sorted(e.name for e in stack):
            raise ValueError(f"the embedding of {placeholder!r} holds the parts {sorted(vector)} but the model's text "
                             f"encoders are {', '.join(e.name for e in stack)}; pass one row per encoder")
        parts = {e.name: vector[e.name] for e in stack}
    elif len(stack) > 1:
        raise ValueError(f"the model has {len(stack)} text encoders ({', '.join(e.name for e in stack)}): pass the "
                         f"embedding of {placeholder!r} as one row per encoder, {{name: row}} (a snapshot of an SDXL "
                         "run: persviz.tea.concept_study.snapshots)")
    else:
        parts = {stack.primary.name: vector}
    with contextlib.ExitStack() as inside:
        for e in stack:
            inside.enter_context(_learned_row(pipe, e, placeholder, parts[e.name]))
        yield


@contextlib.contextmanager
def _learned_row(pipe: Pipeline, text: Any, placeholder: str, vector: Any) -> Iterator[None]:
    """learned_embedding's work on one text encoder of the pipeline's stack (persviz.text_stack.TextEncoder)."""
    vector = torch.as_tensor(vector).detach().float().reshape(-1)
    if not torch.isfinite(vector).all():
        raise ValueError(f"the embedding of {placeholder!r} holds NaN or inf; pick another snapshot")
    weight = text.rows
    if vector.numel() != weight.shape[1]:
        raise ValueError(f"embedding of size {vector.numel()} does not fit the text encoder's width {weight.shape[1]}")
    known = text.has_added(placeholder)
    if not known:
        vocab = text.encoder.config.vocab_size  # diffusers' unload leaves it grown (as persviz.methods restores it)
        load_learned_token(pipe, {placeholder: vector.to(weight.dtype)}, token=placeholder, text=text)
        try:
            yield
        finally:
            pipe.unload_textual_inversion(placeholder, tokenizer=text.tokenizer, text_encoder=text.encoder)
            text.encoder.config.vocab_size = vocab
        return
    with PlaceholderRows(vector[None], [token_row((text.tokenizer, text.encoder), placeholder)]).written(text.encoder):
        yield


def probe_texts(probes: Sequence[Probe], word: str) -> list[str]:
    """The probes' prompts with `word` (the placeholder or the class word) in the slot."""
    if not probes:
        raise ValueError("no probes given; build them with persviz.shapesworld.concepts.eval_prompts")
    return [p["template"].format(word) for p in probes]


def score_images(images: np.ndarray, probes: Sequence[Probe], class_word: str, references: np.ndarray,
                 clip: Any, dino: Any = None, oracle: Any = None, signature: Optional[Mapping] = None,
                 repeats: int = 1) -> dict[str, float]:
    """Mean CLIP-T (full / concept / context), CLIP-I, DINO-I and, on ShapesWorld, the oracle's concept and context rates.

    images holds `repeats` images per probe, probe-major order ([p0 s0, p0 s1, ..., p1 s0, ...]); the means of
    persviz.evaluation.score_per_image (use persviz.evaluation.evaluate for per-image scores and intervals)."""
    scores = score_per_image(images, probes, class_word, references, clip, dino, oracle, signature, repeats)
    return {k: float(v.mean()) for k, v in scores.items()}


def generate_probes(pipe: Pipeline, probes: Sequence[Probe], word: str, repeats: int = 1, seed: int = 0,
                    guidance: float = GUIDANCE, steps: int = STEPS, batch_size: int = 50) -> np.ndarray:
    """`repeats` images per probe (probe-major) with `word` in the slot; image i is seeded seed + i."""
    prompts = [t for t in probe_texts(probes, word) for _ in range(repeats)]
    return generate(pipe, prompts, seed=seed, guidance=guidance, steps=steps, batch_size=batch_size)


def impacts_over_steps(pipe: Pipeline, snapshots: Sequence[tuple[int, torch.Tensor]], placeholder: str, class_word: str,
                       probes: Sequence[Probe], references: np.ndarray, clip: Any, dino: Any = None,
                       oracle: Any = None, signature: Optional[Mapping] = None, repeats: int = 1, seed: int = 0,
                       progress: bool = True, **generation: Any) -> dict[str, list]:
    """Two-way impacts over training: the scores of score_images at each (step, V*) snapshot, as lists by key.
    `generation` (steps, guidance, batch_size) goes to generate_probes."""
    table: dict[str, list] = {"step": []}
    for step, vec in tqdm(list(snapshots), desc="impacts over steps", disable=not progress):
        with learned_embedding(pipe, placeholder, vec):
            images = generate_probes(pipe, probes, placeholder, repeats, seed, **generation)
        scores = score_images(images, probes, class_word, references, clip, dino, oracle, signature, repeats)
        table["step"].append(int(step))
        for k, v in scores.items():
            table.setdefault(k, []).append(v)
    return table


def dominance_over_steps(pipe: Pipeline, fixed: tuple[str, torch.Tensor], varied: tuple[str, Sequence[tuple[int, torch.Tensor]]],
                         template: str, anchors: Mapping[str, np.ndarray], clip: Any, n_images: int = 8,
                         seed: int = 0, progress: bool = True, **generation: Any) -> dict[str, list]:
    """Multi-concept collapse (Fig. 5): one concept fixed, the other at each saved step; CLIP-I to each concept's anchor.
    `generation` (steps, guidance, batch_size) goes to generate.

    template holds both placeholders by name, e.g. '{checkers} next to a {candy}' with placeholders as keys of
    anchors ({'<checkers>': images, '<candy>': images})."""
    (fixed_ph, fixed_vec), (var_ph, var_snaps) = fixed, varied
    prompt = template.format(**{k.strip("<>"): k for k in anchors})
    if fixed_ph not in prompt or var_ph not in prompt:
        raise ValueError(f"the template must name both placeholders; got {prompt!r}")
    table: dict[str, list] = {"step": [], **{f"clip_i_{k}": [] for k in anchors}}
    with learned_embedding(pipe, fixed_ph, fixed_vec):
        for step, vec in tqdm(list(var_snaps), desc="dominance", disable=not progress):
            with learned_embedding(pipe, var_ph, vec):
                images = generate(pipe, [prompt] * n_images, seed=seed, **generation)
            table["step"].append(int(step))
            for k, ref in anchors.items():
                table[f"clip_i_{k}"].append(float(clip_i(clip, images, ref, percent=True).mean()))
    return table


@contextlib.contextmanager
def personalized(pipe: Pipeline, method: str, path: Any) -> Iterator[None]:
    """The pipeline with a finished run loaded ('textual_inversion': learned_embeds; 'dreambooth': LoRA; 'custom_diffusion': K/V processors + token).

    Undone on exit: the token unloaded, the LoRA unloaded, the attention processors put back."""
    with get_method(method).loaded(pipe, Path(path)):  # each method's load and undo (persviz.methods)
        yield


def tea_rows(pipe: Pipeline, method: str, word: str, placeholder: str, class_word: str, probes: Sequence[Probe],
             score: Callable[[np.ndarray], dict], repeats: int = 1, seed: int = 0,
             knobs: Optional[tuple[float, float]] = None, anchor_encoder: Any = None,
             **generation: Any) -> dict[str, dict]:
    """Scores of a loaded run without and with TEA at the paper's knobs (or `knobs`): the rows of Table 6.

    word fills the probes' slot ('<v*>', 'sks square', '<new1> square'). Textual Inversion and Custom Diffusion
    get token-level TEA (Eq. 1) on the placeholder; DreamBooth gets prompt-level TEA (Eq. 2), with token
    positions aligned and, for comparison, unaligned as in the public code. `anchor_encoder`: DreamBooth's
    prompt-level anchor from this text encoder (e.g. the base model's) instead of the fine-tuned one in pipe.
    `generation` (steps, guidance, batch_size) goes to the generation calls."""
    m = get_method(method)
    r, s = knobs if knobs is not None else (None, None)
    rows = {"none": score(generate_probes(pipe, probes, word, repeats, seed, **generation))}
    if m.tea_level == "prompt":
        personal = [t for t in probe_texts(probes, word) for _ in range(repeats)]
        plain = [t for t in probe_texts(probes, class_word) for _ in range(repeats)]
        for label, aligned in (("TEA", True), ("TEA unaligned", False)):
            embeds = encode_prompt_level(pipe, personal, plain, r, s, aligned=aligned, placeholder=placeholder,
                                         class_word=class_word, anchor_encoder=anchor_encoder)
            rows[label] = score(generate_from_embeds(pipe, **embeds_kwargs(embeds), seed=seed, **generation))
    else:
        with tea(pipe, placeholder, class_word, rotation=r, scale=s, method=method):
            rows["TEA"] = score(generate_probes(pipe, probes, word, repeats, seed, **generation))
    return rows


def tea_sweep(pipe: Pipeline, probes: Sequence[Probe], placeholder: str, class_word: str,
              score: Callable[[np.ndarray], dict], rotations: Sequence[float], scales: Sequence[float],
              repeats: int = 1, seed: int = 0, method: str = "textual_inversion", progress: bool = True,
              **generation: Any) -> dict:
    """Token-level TEA over a rotation x scale grid (Table 1, Fig. 6): {score key: array [R, S]}, same seeds everywhere.
    `generation` (steps, guidance, batch_size) goes to generate_probes."""
    grid: dict[str, np.ndarray] = {}
    cells = [(i, j) for i in range(len(rotations)) for j in range(len(scales))]
    for i, j in tqdm(cells, desc="TEA sweep", disable=not progress):
        with tea(pipe, placeholder, class_word, rotation=rotations[i], scale=scales[j], method=method):
            out = score(generate_probes(pipe, probes, placeholder, repeats, seed, **generation))
        for k, v in out.items():
            grid.setdefault(k, np.full((len(rotations), len(scales)), np.nan))[i, j] = v
    return grid


def adaptive_vs_fixed(pipe: Pipeline, probes: Sequence[Probe], placeholder: str, class_word: str, references: np.ndarray,
                      clip: Any, fixed: tuple[float, float] = (0.2, 0.5), schedule: Optional[Sequence[float]] = None,
                      n_images: int = 4, target_frac: float = 1.0, floor_frac: float = 0.9, seed: int = 0,
                      progress: bool = True, **generation: Any) -> list[dict]:
    """Adaptive TEA against the fixed knobs, per probe: rotation searched until the context CLIP-T reaches
    target_frac x that of the class-word prompt (what the base model gives), with CLIP-I kept >= floor_frac x that
    at rotation 0 (the same scale), so rotation 0 is always acceptable. Returns one row per probe: chosen
    rotation, status, and the scores of the untouched token, the fixed knobs and the adaptive choice.
    `generation` (steps, guidance, batch_size) goes to every generation call."""
    rows = []
    for p in tqdm(list(probes), desc="adaptive TEA", disable=not progress):
        prompt = p["template"].format(placeholder)
        sc = make_tea_scorer(pipe, prompt, placeholder, class_word, clip, references, p["context_text"],
                             n_images=n_images, seed=seed, **generation)
        base = generate(pipe, [p["template"].format(class_word)] * n_images, seed=seed, **generation)
        target = target_frac * sc.score(base)[0]
        ctx0, fid0 = sc.score(sc.generate(0.0, fixed[1]))
        res = adaptive_tea(sc.generate, sc.score, schedule or SCHEDULE, target=target, floor=floor_frac * fid0,
                           scale=fixed[1])
        ctx_f, fid_f = sc.score(sc.generate(*fixed))
        chosen = res.chosen
        rows.append({"prompt": prompt, "target": target, "untouched": (ctx0, fid0), "fixed": (ctx_f, fid_f),
                     "adaptive": (chosen.context, chosen.fidelity) if chosen else (float("nan"), float("nan")),
                     "rotation": res.rotation, "status": res.status, "tried": len(res.trace)})
    return rows


def adaptive_images(pipe: Pipeline, probes: Sequence[Probe], placeholder: str, class_word: str,
                    rotations: Sequence[float], fixed: tuple[float, float] = (0.2, 0.5), n_images: int = 4,
                    seed: int = 0, **generation: Any) -> dict[str, np.ndarray]:
    """{'untouched', 'fixed', 'adaptive'}: n_images per probe (probe-major; each probe's images seeded seed,
    seed + 1, ...) with the token as learned, at the fixed knobs, and at each probe's chosen rotation (the fixed
    scale), for persviz.evaluation.evaluate. `rotations`: adaptive_vs_fixed's choice per probe."""
    if len(rotations) != len(probes):
        raise ValueError(f"{len(rotations)} rotations for {len(probes)} probes; pass one per probe")
    out: dict[str, list] = {"untouched": [], "fixed": [], "adaptive": []}
    for p, rot in zip(probes, rotations):
        prompts = [p["template"].format(placeholder)] * n_images
        out["untouched"].append(generate(pipe, prompts, seed=seed, **generation))
        chosen = 0.0 if rot is None or rot != rot else float(rot)  # none acceptable: V*'s direction, fixed scale
        for label, (r, s) in (("fixed", fixed), ("adaptive", (chosen, fixed[1]))):
            with tea(pipe, placeholder, class_word, rotation=r, scale=s):
                out[label].append(generate(pipe, prompts, seed=seed, **generation))
    return {k: np.concatenate(v) for k, v in out.items()}


def rows_summary(ev: Evaluation, pairs: Optional[Sequence[tuple[str, str]]] = None,
                 n_boot: int = N_BOOT) -> dict[str, dict]:
    """{'mean', 'intervals', 'differences'} of an Evaluation of TEA rows, JSON-ready: each row's means and 95 %
    intervals; the paired differences b - a (Wilcoxon, Holm across the metrics) of `pairs`, keyed 'b - a', or by
    default of each TEA row against its method's untouched row ('dreambooth TEA' - 'dreambooth'), keyed by the row."""
    summary = ev.summary(n_boot=n_boot)
    if pairs is None:
        compared = {row: (row.split(" ")[0], row) for row in ev.conditions
                    if " " in row and row.split(" ")[0] in ev.items}
    else:
        compared = {f"{b} - {a}": (a, b) for a, b in pairs}
    return {"mean": {row: {m: iv.mean for m, iv in by.items()} for row, by in summary.items()},
            "intervals": {row: {m: iv.to_json() for m, iv in by.items()} for row, by in summary.items()},
            "differences": {k: {m: d.to_json() for m, d in ev.compare(a, b, n_boot=n_boot).items()}
                            for k, (a, b) in compared.items()}}


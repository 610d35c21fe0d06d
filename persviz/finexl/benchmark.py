"""FineXL's ground-truth benchmark on ShapesWorld: personalized models of exactly known level, four methods, one table.

Variants (base = the ShapesWorld renderer or the shipped micro-SD):
    scene shifts (renderer)   `SceneShiftGenerator`: each aspect (dark, large, striped, red) applied to a
                              fraction p of the images, p in LEVELS, and mixtures (`MIXTURES`).
    style knobs (renderer)    `RendererGenerator(Style(knob=...))`: warmth, bg_darkness, size_scale, blur,
                              outline; the ShapesWorld CLIP has words for two of them at most, so FineXL
                              is expected to do worse here (large residual): reported as it comes.
    LoRA (micro-SD)           the micro-SD with a rank-4 UNet LoRA fine-tuned (`train_variants`) on
                              renders restyled with probability p under their original captions; the
                              realized level is read back by the ShapesWorld oracle (`oracle_levels`).

Methods (`METHOD_SPECS`; each ingredient separable):
    naive            the one bank concept nearest to V_div (weight = projection on f(C)).
    finexl           the paper: f(C) by ", C" append, |cos| order, orthogonality filter e_ortho = 0.03,
                     least squares, greedy until the relative residual < 0.2.
    finexl_improved  the public re-implementation's fix: the same with whitened NNLS.
    persviz          grammar-aware f(C) (`shapesworld_compose`), the orthogonality filter over the
                     concepts pointing along V_div only (``positive_only``: with a non-negative solver
                     an antonym ranked by |cos| only blocks the true concept), whitened NNLS.
                     `grammar_naive`, `persviz_lstsq`, `persviz_absfilter`, `finexl_improved_pos` and
                     `persviz_nofilter` isolate the ingredients.

Commands::

    persviz finexl train     # the LoRA variants -> data/finexl/lora/ (resumable)
    persviz finexl benchmark           # samples (cached), decompositions, metrics, intervals ->
                                                 # data/finexl/benchmark.json, benchmark.md, benchmark_items.npz

Intervals (`bootstrap_benchmark`): the probe prompts are resampled with replacement, and within each drawn
probe its seeds (`persviz.stats`' nested scheme); each draw recomputes every variant's V_div from the stored
per-probe embedding differences (the same draw of probes for every variant) and runs every method and metric
again. The concept directions f(C) and the oracle's realized levels stay those of the full probe set. 95 %
percentile intervals of N_BOOT_BENCH = 1000 seeded draws on each weight, relative residual and summary metric;
``top1_rate``: the fraction of draws where the true concept is top-1. The summary's top-1 rates also get an
interval over the benchmark's items (its variants, `persviz.stats.bootstrap_mean`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from persviz.families.base import Pipeline
from persviz.finexl.decompose import (
    MIN_DIVERGENCE_NORM, Decomposition, append_compose, decompose, divergence_vector, greedy_decompose,
    orthogonal_filter)
from persviz.finexl.concepts import SHAPESWORLD_WORD_BANK, concept_directions, rank_concepts, shapesworld_compose
from persviz.finexl.generators import (
    SCENE_ASPECTS,
    PipelineGenerator,
    RendererGenerator,
    SceneShiftGenerator,
    check_rates,
    scene_shift_dataset,
    shapesworld_probes,
)
from persviz.constants import FINEXL_CACHE_DIR as CACHE_DIR
from persviz.constants import N_BOOT_BENCH
from persviz.io import PathLike, atomic_path, atomic_write_bytes, atomic_write_text, to_jsonable, write_json
from persviz.families import assemble_pipeline
from persviz.loading import load_evaluator
from persviz.metrics import spearman
from persviz.paths import DATA_DIR
from persviz.shapesworld.render import Style
from persviz.stats import LEVEL, bootstrap_mean
from persviz.methods import get_method
from persviz.trainers.lora_finetune import LORA_FILE, load_lora

FINEXL_DIR = DATA_DIR / "finexl"
LORA_DIR = FINEXL_DIR / "lora"
BENCHMARK_JSON = FINEXL_DIR / "benchmark.json"
BENCHMARK_MD = FINEXL_DIR / "benchmark.md"
#: The per-item scores: every variant's per-probe, per-seed embedding differences and the concept directions.
BENCHMARK_ITEMS = FINEXL_DIR / "benchmark_items.npz"
BOOT_SEED = 0

#: Known levels of the single-aspect variants.
LEVELS: tuple[float, ...] = (0.33, 0.67, 1.0)
#: Mixtures of two or three aspects with known rates.
MIXTURES: dict[str, dict[str, float]] = {
    "mix_dark100_striped050": {"dark": 1.0, "striped": 0.5},
    "mix_large067_red100": {"large": 0.67, "red": 1.0},
    "mix_dark050_large050_striped050": {"dark": 0.5, "large": 0.5, "striped": 0.5},
}
#: The concept word of each scene aspect (`SHAPESWORLD_WORD_BANK` entries).
ASPECT_WORD: dict[str, str] = {a: w for a, (_, _, w) in SCENE_ASPECTS.items()}
#: Style-knob variants: knob -> values, and the bank word that is the closest proxy (None: no word exists).
STYLE_KNOBS: dict[str, tuple[tuple[float, ...], Optional[str]]] = {
    "bg_darkness": ((0.35, 0.7, 1.0), "on a black background"),
    "size_scale": ((1.2, 1.4, 1.6), "large"),
    "warmth": ((0.3, 0.6, 0.9), "red"),
    "blur": ((0.5, 1.0, 1.5), None),
    "outline": ((0.5, 1.0, 1.5), None),
}
#: Training data of the LoRA variants: scenes `sample_scenes(TRAIN_N, TRAIN_SEED)`.
TRAIN_N, TRAIN_SEED = 2048, 100
#: Probes: `shapesworld_probes(N_PROBES, PROBE_SEED, p_second=0)` (one object, so every aspect has one referent).
N_PROBES, PROBE_SEED = 48, 1
SEEDS: tuple[int, ...] = (0, 1000)
E_ORTHO, E_DECOMP = 0.03, 0.2
#: LoRA variants whose oracle-read level is below this changed (almost) nothing: `top1_realized` leaves them out.
MIN_REALIZED = 0.1


def _tag(p: float) -> str:
    return f"{int(round(100 * p)):03d}"


def single_variants() -> dict[str, dict[str, float]]:
    """``{name: rates}`` of the single-aspect variants, e.g. ``"dark_067": {"dark": 0.67}``."""
    return {f"{a}_{_tag(p)}": {a: p} for a in SCENE_ASPECTS for p in LEVELS}


def lora_variants() -> dict[str, dict[str, float]]:
    """Every scene-shift variant (single aspects at `LEVELS`, then `MIXTURES`)."""
    return {**single_variants(), **MIXTURES}


# ----------------------------------------------------------------------------- LoRA variants


def train_variants(names: Optional[Sequence[str]] = None, steps: int = 450, batch_size: int = 16, lr: float = 2e-3,
                   device: Optional[str] = None, out_dir: Path = LORA_DIR, runs_dir: Path = CACHE_DIR / "runs",
                   n_images: int = TRAIN_N, progress: bool = True) -> dict[str, Path]:
    """Fine-tune one rank-4 UNet LoRA of the micro-SD per variant; resumable; ships the final weights to out_dir.

    Each variant's data: `scene_shift_dataset(n_images, rates, TRAIN_SEED)` (full captions of the
    scenes as they were, images after the aspect edits). The run (snapshots, resume state)
    lives in ``runs_dir/<name>``; ``out_dir/<name>`` gets ``pytorch_lora_weights.safetensors``
    and ``train.json`` (rates, config, final loss).

    Returns:
        ``{name: shipped weights file}``.
    """
    variants = lora_variants()
    names = list(variants) if names is None else list(names)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {list(variants)}.")
    pipe = assemble_pipeline(device=device, dtype=torch.float32)  # adapters and base in float32 also on a GPU
    finetune = get_method("lora_finetune", concept_only=False)  # the registry's LoRA fine-tune (persviz.methods)
    config = finetune.recipe("", "", shapesworld=True, steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                             save_every=max(1, int(steps) // 2))
    shipped = {}
    for name in tqdm(names, desc="LoRA variants", disable=not progress):
        captions, images, applied = scene_shift_dataset(n_images, variants[name], seed=TRAIN_SEED)
        t0 = time.perf_counter()
        res = finetune.train(pipe, (images, captions), config, Path(runs_dir) / name, progress=progress,
                             load_result=False)
        dest = Path(out_dir) / name
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest / LORA_FILE, res.final_path.read_bytes())
        info = {"variant": name, "rates": variants[name], "applied_fraction": dict(zip(SCENE_ASPECTS,
                                                                                        applied.mean(0).tolist())),
                "n_images": int(n_images), "data_seed": TRAIN_SEED, "config": config.__dict__,
                "final_loss_mean_last_100": float(np.mean(res.loss_history[-100:])),
                "train_seconds_this_call": round(time.perf_counter() - t0, 1),
                "device": str(pipe.device),
                "command": f"persviz finexl train --steps {steps} --batch-size {batch_size} "
                           f"--lr {lr}"}
        write_json(dest / "train.json", info)
        shipped[name] = dest / LORA_FILE
    return shipped


def lora_pipeline(name: Optional[str], pipe: Pipeline = None, lora_dir: Path = LORA_DIR) -> Any:
    """The micro-SD with the shipped LoRA of a variant loaded (None: the base); reuses ``pipe`` when given."""
    pipe = assemble_pipeline() if pipe is None else pipe
    pipe.unload_lora_weights()  # a no-op without LoRA
    if name is not None:
        f = Path(lora_dir) / name / "pytorch_lora_weights.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"no LoRA of variant {name!r} at {f}; train it with "
                                    f"`persviz finexl train`.")
        load_lora(pipe, f)
    return pipe



# ----------------------------------------------------------------------------- oracle levels


def aspect_present(readings: Sequence[dict]) -> np.ndarray:
    """bool [N, len(SCENE_ASPECTS)]: which aspects the oracle reads in each image (main object = first one found)."""
    out = np.zeros((len(readings), len(SCENE_ASPECTS)), dtype=bool)
    for i, r in enumerate(readings):
        objs = [r[k] for k in ("left", "center", "right") if r.get(k) is not None]
        for j, (attr, value, _) in enumerate(SCENE_ASPECTS.values()):
            if attr == "background":
                out[i, j] = r["background"] == value
            else:
                out[i, j] = bool(objs) and objs[0][attr] == value
    return out


def realized_levels(present_base: np.ndarray, present_personal: np.ndarray) -> dict[str, float]:
    """``{aspect: (q_p - q_b) / (1 - q_b)}``: the fraction of images the personalization gave the aspect that
    the base did not have, from the oracle's readings (q: fraction with the aspect); comparable to p."""
    qb, qp = present_base.mean(0), present_personal.mean(0)
    return {a: float((qp[j] - qb[j]) / (1.0 - qb[j])) if qb[j] < 1.0 else float("nan")
            for j, a in enumerate(SCENE_ASPECTS)}


def realized_interval(present_base: np.ndarray, present_personal: np.ndarray, n_seeds: int, n_boot: int = 1000,
                      level: float = LEVEL, seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals of ``realized_levels`` over probes (seeds nested, the same draw for base and LoRA, as
    ``persviz.stats`` draws): presence arrays [S * P, A] stacked seed-major ([s0 p0, s0 p1, ..., s1 p0, ...])."""
    b = np.asarray(present_base, dtype=np.float64)
    q = np.asarray(present_personal, dtype=np.float64)
    if b.shape != q.shape or b.ndim != 2 or b.shape[0] % int(n_seeds):
        raise ValueError(f"presence arrays {b.shape} and {q.shape}: pass [seeds x probes, aspects] of both")
    s = int(n_seeds)
    p = b.shape[0] // s
    b3, q3 = b.reshape(s, p, -1).transpose(1, 0, 2), q.reshape(s, p, -1).transpose(1, 0, 2)  # [P, S, A]
    rng = np.random.default_rng(seed)
    which = rng.integers(0, p, size=(n_boot, p))
    cols = np.floor(rng.random((n_boot, p, s)) * s).astype(np.int64)
    qb = b3[which[..., None], cols].mean(axis=(1, 2))  # [n_boot, A]
    qp = q3[which[..., None], cols].mean(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (qp - qb) / (1.0 - qb)
    out = {}
    for j, a in enumerate(SCENE_ASPECTS):
        x = r[:, j][np.isfinite(r[:, j])]
        out[a] = ([float(v) for v in np.quantile(x, [(1 - level) / 2, (1 + level) / 2])] if x.size
                  else [float("nan"), float("nan")])
    return out


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """One explanation method: how f(C) is built, whether the orthogonality filter runs, and the solver.

    Attributes:
        compose: "append" (the paper's ", C") or "grammar" (`shapesworld_compose`).
        solver: "naive" (the single concept of highest cosine, weight = projection), "lstsq" or
            "whitened_nnls" (greedy until the relative residual < E_DECOMP).
        e_ortho: the orthogonality filter's threshold; None: no filter, one solve over the whole bank.
        positive_only: the filter considers only concepts with cos(f(C), V_div) > 0 (`orthogonal_filter`).
    """

    compose: str
    solver: str
    e_ortho: Optional[float] = E_ORTHO
    positive_only: bool = False


#: The methods of the table; "naive", "finexl", "finexl_improved" and "persviz" are the headline four, the
#: others isolate one ingredient each (f(C) by grammar, the solver, the sign-aware filter, no filter).
METHOD_SPECS: dict[str, MethodSpec] = {
    "naive": MethodSpec("append", "naive"),
    "finexl": MethodSpec("append", "lstsq"),
    "finexl_improved": MethodSpec("append", "whitened_nnls"),
    "finexl_improved_pos": MethodSpec("append", "whitened_nnls", positive_only=True),
    "grammar_naive": MethodSpec("grammar", "naive"),
    "persviz_lstsq": MethodSpec("grammar", "lstsq"),
    "persviz_absfilter": MethodSpec("grammar", "whitened_nnls"),
    "persviz": MethodSpec("grammar", "whitened_nnls", positive_only=True),
    "persviz_nofilter": MethodSpec("grammar", "whitened_nnls", None),
}
HEADLINE: tuple[str, ...] = ("naive", "finexl", "finexl_improved", "persviz")
COMPOSERS: dict[str, Callable[[str, str], str]] = {"append": append_compose, "grammar": shapesworld_compose}


def naive_explain(v_div: torch.Tensor, concepts: Mapping[str, torch.Tensor]) -> Decomposition:
    """The naive baseline: the one concept of highest (signed) cosine with v_div, weighted by its projection."""
    name = max(rank_concepts(v_div, concepts), key=lambda nc: nc[1])[0]
    return decompose(v_div, {name: concepts[name]}, method="lstsq", e_decomp=E_DECOMP)


def explain_with(spec: MethodSpec, v_div: torch.Tensor, concepts: Mapping[str, torch.Tensor]) -> Decomposition:
    """The decomposition one method gives (concepts: f(C) built with ``spec.compose``)."""
    if spec.solver == "naive":
        return naive_explain(v_div, concepts)
    if spec.e_ortho is None:
        return decompose(v_div, dict(concepts), method=spec.solver, e_decomp=E_DECOMP)
    order = orthogonal_filter(v_div, dict(concepts), eps_ortho=spec.e_ortho, positive_only=spec.positive_only)
    return greedy_decompose(v_div, dict(concepts), order=order, method=spec.solver, e_decomp=E_DECOMP)[0]


# ----------------------------------------------------------------------------- metrics


def top1_correct(weights: Mapping[str, float], true_concept: str) -> bool:
    """True when ``true_concept`` has the highest weight and that weight is positive."""
    if not weights:
        return False
    best = max(weights, key=lambda c: weights[c])
    return best == true_concept and weights[best] > 0.0


def predicted_levels(weights: Mapping[str, float], calibration: Mapping[str, float]) -> dict[str, float]:
    """Weight / calibration (weight per unit level) per concept; concepts without one use the calibrations' mean."""
    mean_k = float(np.mean(list(calibration.values())))
    return {c: float(w) / calibration.get(c, mean_k) for c, w in weights.items()}


def multi_aspect_error(predicted: Mapping[str, float], truth: Mapping[str, float]) -> float:
    """``sum_c |predicted_c - truth_c| / sum_c truth_c`` over every concept of either (missing = 0).

    A relative L1 error of the level vector: false positives (a level on a concept the model did
    not change) and misses count alike; 0 is perfect, 1 is as bad as predicting nothing.
    """
    total = sum(abs(v) for v in truth.values())
    if total <= 0:
        raise ValueError("truth has no positive level: the multi-aspect error is relative to the sum of true levels.")
    keys = set(predicted) | set(truth)
    return float(sum(abs(predicted.get(k, 0.0) - truth.get(k, 0.0)) for k in keys) / total)


def improvement(new: float, old: float, higher_is_better: bool = True) -> float:
    """Relative improvement of ``new`` over ``old``: (new - old) / old for accuracies, (old - new) / old for errors."""
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return float("nan")
    return (new - old) / abs(old) if higher_is_better else (old - new) / abs(old)


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class Variant:
    """A personalized model of known level: its name, group, truth ``{concept word: level}`` and V_div."""

    name: str
    group: str
    truth: dict[str, float]
    v_div: torch.Tensor
    spread: float
    rates: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: float32 [probes, seeds, D]: normalise(e_personal) - normalise(e_base) of each pair (V_div is their mean).
    diffs: Optional[np.ndarray] = field(default=None, repr=False)


def pair_differences(emb_personal: Any, emb_base: Any, n_seeds: int) -> np.ndarray:
    """float32 [P, S, D]: the normalised embedding difference of each (probe, seed) pair, from embeddings stacked
    seed-major as the benchmark renders them ([s0 p0, s0 p1, ..., s1 p0, ...])."""
    p = np.asarray(emb_personal.detach().cpu() if hasattr(emb_personal, "detach") else emb_personal, np.float64)
    b = np.asarray(emb_base.detach().cpu() if hasattr(emb_base, "detach") else emb_base, np.float64)
    if p.shape != b.shape or p.ndim != 2 or p.shape[0] % int(n_seeds):
        raise ValueError(f"embeddings {p.shape} and {b.shape}: pass [seeds x probes, D] of both, paired")
    d = p / np.linalg.norm(p, axis=1, keepdims=True) - b / np.linalg.norm(b, axis=1, keepdims=True)
    return d.reshape(int(n_seeds), -1, d.shape[1]).transpose(1, 0, 2).astype(np.float32)


def bootstrap_v_div(diffs: np.ndarray, n_boot: int = N_BOOT_BENCH, seed: int = BOOT_SEED) -> np.ndarray:
    """float64 [n_boot, D]: V_div of n_boot nested bootstrap draws of the probes (probes with replacement, then
    each drawn probe's seeds with replacement), from per-pair differences [P, S, D]. The draws of indices are
    `persviz.stats.bootstrap_draws`' with the same seed, so the projection of the draws on any direction u equals
    bootstrap_draws of the per-pair projections diffs @ u."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 3 or 0 in d.shape:
        raise ValueError(f"diffs must be [probes, seeds, D] with at least one of each; got shape {d.shape}")
    p, w = d.shape[:2]
    rng = np.random.default_rng(seed)
    which = rng.integers(0, p, size=(n_boot, p))
    if w == 1:
        return d[which, 0].mean(axis=1)
    cols = np.floor(rng.random((n_boot, p, w)) * w).astype(np.int64)  # every probe has all S seeds
    out = np.empty((n_boot, d.shape[2]))
    for i in range(0, n_boot, 100):  # [100, P, S, D] at a time
        out[i:i + 100] = d[which[i:i + 100, :, None], cols[i:i + 100]].mean(axis=(1, 2))
    return out


def renderer_levels() -> tuple[float, ...]:
    """Levels of the renderer's scene-shift variants (six; cheap to render)."""
    return (0.17, 0.33, 0.5, 0.67, 0.83, 1.0)


#: Extra mixtures for the renderer group (the LoRA group has `MIXTURES` only).
RENDER_MIXTURES: dict[str, dict[str, float]] = {
    **MIXTURES,
    "mix_all050": {"dark": 0.5, "large": 0.5, "striped": 0.5, "red": 0.5},
    "mix_dark033_red067": {"dark": 0.33, "red": 0.67},
    "mix_large100_striped033": {"large": 1.0, "striped": 0.33},
}


def truth_of(rates: Mapping[str, float]) -> dict[str, float]:
    """``{concept word: level}`` of scene-shift rates."""
    return {ASPECT_WORD[a]: float(p) for a, p in check_rates(rates).items() if p > 0}


class Bench:
    """Probes, encoder and concept directions shared by every variant (built once)."""

    def __init__(self, n_probes: int = N_PROBES, seeds: Sequence[int] = SEEDS, clip: Any = None,
                 bank: Sequence[str] = SHAPESWORLD_WORD_BANK):
        self.clip = load_evaluator(kind="clip") if clip is None else clip
        self.prompts, scenes = shapesworld_probes(int(n_probes), seed=PROBE_SEED, p_second=0.0)
        self.scenes = dict(zip(self.prompts, scenes))
        self.seeds = [int(s) for s in seeds]
        self.bank = list(bank)
        self.directions = {k: concept_directions(self.clip.embed_texts, self.prompts, self.bank, compose=c)
                           for k, c in COMPOSERS.items()}
        self.base_render = SceneShiftGenerator({}, scenes=self.scenes)
        self._base_images = self._render(self.base_render)
        self._base_emb = self.clip.embed_images(self._base_images)

    def _render(self, gen: Any) -> np.ndarray:
        return np.concatenate([gen(self.prompts, s) for s in self.seeds])

    def renderer_variant(self, name: str, group: str, gen: Any, truth: Mapping[str, float],
                         rates: Optional[Mapping[str, float]] = None) -> Variant:
        """A renderer variant against the base renderer (same prompts, seeds, layouts)."""
        imgs = self._render(gen)
        emb = self.clip.embed_images(imgs)
        v, spread = divergence_vector(emb, self._base_emb)
        return Variant(name, group, dict(truth), v, spread, dict(rates or {}),
                       diffs=pair_differences(emb, self._base_emb, len(self.seeds)))

    def image_variant(self, name: str, group: str, base_images: np.ndarray, images: np.ndarray,
                      truth: Mapping[str, float], rates: Mapping[str, float], info: dict) -> Variant:
        """A variant from paired samples (e.g. the micro-SD base vs a LoRA)."""
        emb, emb_base = self.clip.embed_images(images), self.clip.embed_images(base_images)
        v, spread = divergence_vector(emb, emb_base)
        return Variant(name, group, dict(truth), v, spread, dict(rates), info,
                       diffs=pair_differences(emb, emb_base, len(self.seeds)))

    def explain(self, variant: Variant, method: str) -> Decomposition:
        """One method's decomposition of one variant."""
        spec = METHOD_SPECS[method]
        return explain_with(spec, variant.v_div, self.directions[spec.compose])



def lora_samples(name: Optional[str], prompts: Sequence[str], seeds: Sequence[int], pipe: Pipeline = None,
                 cache_dir: Path = CACHE_DIR / "samples") -> np.ndarray:
    """uint8 [len(seeds) * P, 32, 32, 3] of the micro-SD (with variant ``name``'s LoRA; None: base), cached on disk.

    The cache key holds the prompts, the seeds and the LoRA file's size and mtime, so a retrained
    LoRA is sampled again.
    """
    f = None if name is None else Path(LORA_DIR) / name / "pytorch_lora_weights.safetensors"
    stamp = None if f is None or not f.is_file() else [f.stat().st_size, f.stat().st_mtime_ns]
    key = json.dumps({"variant": name, "prompts": list(prompts), "seeds": [int(s) for s in seeds], "lora": stamp})
    path = Path(cache_dir) / f"{name or 'base'}.npz"
    if path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return z["images"]
    pipe = lora_pipeline(name, pipe)
    gen = PipelineGenerator(pipe)
    images = np.concatenate([gen(list(prompts), int(s)) for s in seeds])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images, key=np.array(key))
    return images


def build_variants(bench: Bench, lora: bool = True, progress: bool = True) -> list[Variant]:
    """Every variant of the benchmark: scene shifts and style knobs on the renderer, and the shipped LoRAs."""
    out: list[Variant] = []
    jobs: list[tuple[str, str, Any, dict, dict]] = []
    for a in SCENE_ASPECTS:
        for p in renderer_levels():
            r = {a: p}
            gen = SceneShiftGenerator(r, scenes=bench.scenes)
            jobs.append((f"render/{a}_{_tag(p)}", "render_single", gen, truth_of(r), r))
    for name, r in RENDER_MIXTURES.items():
        jobs.append((f"render/{name}", "render_mixture", SceneShiftGenerator(r, scenes=bench.scenes), truth_of(r), r))
    for knob, (values, word) in STYLE_KNOBS.items():
        for v in values:
            truth = {word: float(v)} if word else {}
            gen = RendererGenerator(Style(**{knob: v}), scenes=bench.scenes)
            jobs.append((f"style/{knob}_{v:g}", "style_knob", gen, truth, {knob: float(v)}))
    for name, group, gen, truth, r in tqdm(jobs, desc="renderer variants", disable=not progress, leave=False):
        out.append(bench.renderer_variant(name, group, gen, truth, r))
    if lora:
        out.extend(lora_variants_measured(bench, progress=progress))
    return out


def lora_variants_measured(bench: Bench, names: Optional[Sequence[str]] = None, oracle: Any = None,
                           progress: bool = True) -> list[Variant]:
    """The shipped LoRA variants as `Variant`s; truth = the oracle's realized levels (`realized_levels`)."""
    oracle = load_evaluator(kind="oracle") if oracle is None else oracle
    names = [n for n in lora_variants() if (Path(LORA_DIR) / n / "pytorch_lora_weights.safetensors").is_file()] \
        if names is None else list(names)
    if not names:
        return []
    pipe = assemble_pipeline(dtype=torch.float32)
    base = lora_samples(None, bench.prompts, bench.seeds, pipe)
    present_b = aspect_present(oracle.read(base))
    out = []
    for name in tqdm(names, desc="LoRA variants", disable=not progress, leave=False):
        rates = lora_variants()[name]
        imgs = lora_samples(name, bench.prompts, bench.seeds, pipe)
        present_p = aspect_present(oracle.read(imgs))
        realized = realized_levels(present_b, present_p)
        truth = {ASPECT_WORD[a]: max(0.0, realized[a]) for a in rates}
        info = {"rates": rates, "realized": realized,
                "realized_interval": realized_interval(present_b, present_p, len(bench.seeds)),
                "fraction_base": dict(zip(SCENE_ASPECTS, present_b.mean(0).tolist())),
                "fraction_personal": dict(zip(SCENE_ASPECTS, present_p.mean(0).tolist()))}
        group = "lora_single" if len(rates) == 1 else "lora_mixture"
        out.append(bench.image_variant(f"lora/{name}", group, base, imgs, truth, rates, info))
    lora_pipeline(None, pipe)
    return out


def _calibration(bench: Bench, variants: Sequence[Variant], method: str) -> dict[str, float]:
    """Weight per unit level of each aspect word for one method: its weight on the renderer variant at p = 1
    (the projection coefficient on f(word) where the method gives the word no positive weight)."""
    by_name = {v.name: v.v_div for v in variants}
    return calibration(bench.directions, {a: by_name[f"render/{a}_100"] for a in ASPECT_WORD}, method)


def calibration(directions: Mapping[str, Mapping[str, torch.Tensor]], v_full: Mapping[str, torch.Tensor],
                method: str) -> dict[str, float]:
    """`_calibration` from the concept directions by composer and each aspect's V_div at p = 1 ({aspect: V_div})."""
    spec = METHOD_SPECS[method]
    f = directions[spec.compose]
    out = {}
    for a, word in ASPECT_WORD.items():
        v = v_full[a]
        w = explain_with(spec, v, f).as_dict().get(word, 0.0)
        if w <= 1e-6:
            fw = f[word].double()
            w = float(v.double() @ fw / (fw @ fw))
        out[word] = float(w)
    return out


def evaluate(bench: Bench, variants: Sequence[Variant], methods: Sequence[str] = tuple(METHOD_SPECS),
             progress: bool = True) -> dict[str, Any]:
    """Run every method on every variant and compute the metrics; returns the benchmark's JSON object."""
    rows: dict[str, dict[str, Any]] = {}
    for v in tqdm(variants, desc="decompositions", disable=not progress, leave=False):
        row = {"group": v.group, "truth": v.truth, "rates": v.rates, "v_div_norm": float(v.v_div.norm()),
               "spread": v.spread, **v.info, "methods": {}}
        for m in methods:
            dec = bench.explain(v, m)
            row["methods"][m] = {"weights": {n: round(float(w), 5) for n, w in dec.as_dict().items()},
                                 "relative_residual": round(dec.relative_residual, 5)}
        rows[v.name] = row
    calib = {m: _calibration(bench, variants, m) for m in methods}
    groups = sorted({v.group for v in variants})
    summary = summarize(rows, calib, methods, groups)
    return {"variants": rows, "summary": summary, "calibration": calib, "groups": groups}


def summarize(rows: dict[str, dict[str, Any]], calib: Mapping[str, Mapping[str, float]], methods: Sequence[str],
              groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The summary {method: {"group/metric": value}} of rows holding each method's weights and relative residual;
    writes "top1", "predicted_levels" and "multi_aspect_error" into the rows' methods as it goes."""
    summary: dict[str, dict[str, Any]] = {}
    for m in methods:
        s: dict[str, Any] = {}
        for g in groups:
            names = [n for n, r in rows.items() if r["group"] == g]
            res = [rows[n]["methods"][m]["relative_residual"] for n in names]
            s[f"{g}/relative_residual"] = float(np.mean(res))
            single = [n for n in names if len(rows[n]["truth"]) == 1]
            if single and g != "render_mixture" and g != "lora_mixture":
                hits = [top1_correct(rows[n]["methods"][m]["weights"], next(iter(rows[n]["truth"])))
                        for n in single]
                for n, h in zip(single, hits):
                    rows[n]["methods"][m]["top1"] = h
                s[f"{g}/top1"] = float(np.mean(hits))
                if g == "lora_single":
                    real = [h for n, h in zip(single, hits) if next(iter(rows[n]["truth"].values())) >= MIN_REALIZED]
                    s[f"{g}/top1_realized"] = float(np.mean(real)) if real else float("nan")
                by_word: dict[str, list[tuple[float, float]]] = {}
                for n in single:
                    word, level = next(iter(rows[n]["truth"].items()))
                    lv = level if g != "lora_single" else rows[n]["realized"][next(iter(rows[n]["rates"]))]
                    by_word.setdefault(word, []).append((lv, rows[n]["methods"][m]["weights"].get(word, 0.0)))
                rhos = {w: spearman([a for a, _ in pts], [b for _, b in pts]) for w, pts in by_word.items()}
                s[f"{g}/spearman_by_concept"] = rhos
                finite = [r for r in rhos.values() if math.isfinite(r)]
                s[f"{g}/spearman"] = float(np.mean(finite)) if finite else float("nan")
            mixed = [n for n in names if len(rows[n]["truth"]) > 1]
            if mixed:
                errs = []
                for n in mixed:
                    pred = predicted_levels(rows[n]["methods"][m]["weights"], calib[m])
                    e = multi_aspect_error(pred, rows[n]["truth"])
                    rows[n]["methods"][m]["predicted_levels"] = {k: round(x, 4) for k, x in pred.items()}
                    rows[n]["methods"][m]["multi_aspect_error"] = e
                    errs.append(e)
                s[f"{g}/multi_aspect_error"] = float(np.mean(errs))
        summary[m] = s
    return summary


def _interval(x: np.ndarray, level: float = LEVEL) -> Optional[list[float]]:
    """[low, high] percentile interval of the finite draws (None when none is finite)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return None
    lo, hi = np.quantile(x, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 5), round(float(hi), 5)]


def bootstrap_benchmark(variants: Sequence[Variant], rows: dict[str, dict[str, Any]],
                        directions: Mapping[str, Mapping[str, torch.Tensor]],
                        methods: Sequence[str] = tuple(METHOD_SPECS), n_boot: int = N_BOOT_BENCH,
                        seed: int = BOOT_SEED, level: float = LEVEL, progress: bool = True) -> dict[str, Any]:
    """Intervals of the benchmark over probe prompts (see the module's docstring); writes into ``rows`` (as
    `evaluate` returns them) each method's "weight_intervals" {concept: [low, high]} (the concepts it weighs and
    the true ones), "relative_residual_interval" and, on single-aspect variants, "top1_rate" (fraction of draws).

    Every variant needs ``diffs`` [P, S, D] with the same P and S; draw b resamples the same probes and seeds for
    all of them. Returns {"n_boot", "seed", "level", "summary": {method: {"group/metric": [low, high]}},
    "top1_items": {method: {"group/top1": persviz.stats Interval over the group's variants}}}. A draw whose V_div
    vanishes (only unchanged probes drawn, possible at low rates) explains nothing: no weight, no top-1, its
    residual left out; the row counts them ("zero_draws").
    """
    if not variants:
        raise ValueError("no variants to bootstrap")
    missing = [v.name for v in variants if v.diffs is None]
    if missing:
        raise ValueError(f"variants {missing[:3]} carry no per-pair differences (diffs); build them with Bench")
    shapes = {v.diffs.shape for v in variants}
    if len(shapes) != 1:
        raise ValueError(f"variants' diffs differ in shape ({sorted(shapes)}): bootstrap variants of one benchmark")
    draws = {v.name: bootstrap_v_div(v.diffs, n_boot, seed) for v in variants}
    groups = sorted({v.group for v in variants})
    full = {a: f"render/{a}_100" for a in ASPECT_WORD}
    can_calibrate = all(n in draws for n in full.values())
    per_key: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    weights: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    residual = {(v.name, m): np.empty(n_boot) for v in variants for m in methods}
    top1 = {(v.name, m): np.zeros(n_boot, dtype=bool) for v in variants for m in methods}
    zero_draws = {v.name: 0 for v in variants}
    for v in variants:
        for m in methods:
            keep = set(rows[v.name]["methods"][m]["weights"]) | set(v.truth)
            weights[(v.name, m)] = {c: np.zeros(n_boot) for c in keep}
    for b in tqdm(range(n_boot), desc="bootstrap over probes", disable=not progress, leave=False):
        rows_b: dict[str, dict[str, Any]] = {}
        for v in variants:
            vb = torch.from_numpy(draws[v.name][b])
            rb = {k: rows[v.name][k] for k in ("group", "truth", "rates", "realized") if k in rows[v.name]}
            rb["methods"] = {}
            empty = float(vb.norm()) < MIN_DIVERGENCE_NORM  # every drawn probe unchanged (a low-rate variant)
            zero_draws[v.name] += empty
            for m in methods:
                if empty:  # nothing to explain: no weight, no top-1, no residual
                    w, res = {}, float("nan")
                else:
                    dec = explain_with(METHOD_SPECS[m], vb, directions[METHOD_SPECS[m].compose])
                    w, res = dec.as_dict(), dec.relative_residual
                rb["methods"][m] = {"weights": w, "relative_residual": res}
                residual[(v.name, m)][b] = res
                for c, arr in weights[(v.name, m)].items():
                    arr[b] = w.get(c, 0.0)
            rows_b[v.name] = rb
        if can_calibrate:
            v_full = {a: torch.from_numpy(draws[n][b]) for a, n in full.items()}
            calib_b = {m: calibration(directions, v_full, m) for m in methods}
        else:
            calib_b = {m: {w: 1.0 for w in ASPECT_WORD.values()} for m in methods}
        summary_b = summarize(rows_b, calib_b, methods, groups)
        for m in methods:
            for key, val in summary_b[m].items():
                if isinstance(val, (int, float)):
                    per_key[m].setdefault(key, []).append(float(val))
            for n, rb in rows_b.items():
                top1[(n, m)][b] = bool(rb["methods"][m].get("top1", False))
    for v in variants:
        if zero_draws[v.name]:
            rows[v.name]["zero_draws"] = int(zero_draws[v.name])
        for m in methods:
            r = rows[v.name]["methods"][m]
            r["weight_intervals"] = {c: _interval(a, level) for c, a in weights[(v.name, m)].items()}
            r["relative_residual_interval"] = _interval(residual[(v.name, m)], level)
            if "top1" in r:
                r["top1_rate"] = round(float(top1[(v.name, m)].mean()), 4)
    summary_iv = {m: {k: _interval(np.array(x), level) for k, x in per_key[m].items()} for m in methods}
    items: dict[str, dict[str, Any]] = {}
    for m in methods:
        items[m] = {}
        for g in groups:
            hits = [float(rows[v.name]["methods"][m]["top1"]) for v in variants
                    if v.group == g and "top1" in rows[v.name]["methods"][m]]
            if hits:
                items[m][f"{g}/top1"] = bootstrap_mean(np.array(hits)[:, None], level=level, seed=seed).to_json()
    return {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
            "over": "probe prompts (seeds nested); f(C) and realized levels fixed", "summary": summary_iv,
            "top1_items": items, "vs_naive": paired_vs(per_key, "naive", n_boot, level)}


def paired_vs(per_key: Mapping[str, Mapping[str, Sequence[float]]], reference: str, n_boot: int,
              level: float = LEVEL) -> dict[str, dict[str, dict[str, Optional[list[float]]]]]:
    """Paired intervals against ``reference`` over the same bootstrap draws: per method and summary key with a
    value in every draw, "difference" (method - reference) and, for errors and residuals, "reduction"
    ((reference - method) / reference), each [low, high]."""
    if reference not in per_key:
        return {}
    out: dict[str, dict[str, dict[str, Optional[list[float]]]]] = {}
    for m, keys in per_key.items():
        if m == reference:
            continue
        out[m] = {}
        for k, x in keys.items():
            ref = per_key[reference].get(k)
            if ref is None or len(x) != n_boot or len(ref) != n_boot:
                continue
            a, r = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
            rec = {"difference": _interval(a - r, level)}
            if k.endswith("/multi_aspect_error") or k.endswith("/relative_residual"):
                with np.errstate(divide="ignore", invalid="ignore"):
                    rec["reduction"] = _interval((r - a) / r, level)
            out[m][k] = rec
    return out


def save_items(path: PathLike, variants: Sequence[Variant], bench: Any) -> Path:
    """The per-item scores of the benchmark as a compressed .npz (atomically): "names", "groups", "diffs" float32
    [variants, probes, seeds, D], "prompts", "seeds", "bank" and the concept directions "f_<composer>" [K, D]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"names": np.array([v.name for v in variants]), "groups": np.array([v.group for v in variants]),
              "diffs": np.stack([v.diffs for v in variants]).astype(np.float32),
              "prompts": np.array(list(bench.prompts)), "seeds": np.array(list(bench.seeds)),
              "bank": np.array(list(bench.bank))}
    for k, f in bench.directions.items():
        arrays[f"f_{k}"] = np.stack([np.asarray(f[c].detach().cpu(), np.float32) for c in bench.bank])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


def load_items(path: PathLike = BENCHMARK_ITEMS) -> dict[str, Any]:
    """What `save_items` wrote: {"diffs": {variant: [P, S, D]}, "groups": {variant: group}, "prompts", "seeds",
    "directions": {composer: {concept: float64 tensor [D]}}}; with a result's rows, enough for
    `bootstrap_benchmark` (build `Variant`s with ``diffs``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark items at {path}; `persviz finexl benchmark` writes them")
    with np.load(path) as z:
        names = [str(x) for x in z["names"]]
        bank = [str(x) for x in z["bank"]]
        return {"diffs": dict(zip(names, z["diffs"])), "groups": dict(zip(names, (str(g) for g in z["groups"]))),
                "prompts": [str(x) for x in z["prompts"]], "seeds": [int(x) for x in z["seeds"]],
                "directions": {k[2:]: {c: torch.from_numpy(z[k][i].astype(np.float64)) for i, c in enumerate(bank)}
                               for k in z.files if k.startswith("f_")}}


PAPER_CLAIMS = {"single_aspect_accuracy_gain": 0.56, "multi_aspect_error_reduction": 0.50}


def weight_interval_lines(result: Mapping[str, Any], methods: Sequence[str] = HEADLINE) -> list[str]:
    """Markdown bullets summarising the weight intervals on the true concepts: per method and single-aspect group,
    the median interval width relative to the weight, and how many variants' intervals exclude 0."""
    out = ["Weight on the true concept, intervals over probes (median width / weight; variants whose interval "
           "excludes 0):", ""]
    for m in methods:
        parts = []
        for g in ("render_single", "lora_single", "style_knob"):
            rel, pos, n = [], 0, 0
            for row in result["variants"].values():
                if row["group"] != g or len(row["truth"]) != 1 or m not in row["methods"]:
                    continue
                word = next(iter(row["truth"]))
                iv = (row["methods"][m].get("weight_intervals") or {}).get(word)
                if iv is None or None in iv:
                    continue
                n += 1
                w = row["methods"][m]["weights"].get(word, 0.0)
                pos += iv[0] > 0
                if abs(w) > 1e-9:
                    rel.append((iv[1] - iv[0]) / abs(w))
            if n:
                width = f"{np.median(rel):.2f}" if rel else "–"
                parts.append(f"{g} {width}, {pos}/{n} > 0")
        if parts:
            out.append(f"- {m}: " + "; ".join(parts))
    return out


def ratios(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """persviz and FineXL against naive and the original FineXL, beside the paper's claims (+56%, >= 50% less)."""
    out: dict[str, dict[str, float]] = {}
    for new in ("finexl", "finexl_improved", "persviz"):
        for old in ("naive", "finexl"):
            if new == old or new not in summary or old not in summary:
                continue
            r = {}
            for key in summary[new]:
                if key.endswith("/top1") or key.endswith("/top1_realized") or key.endswith("/spearman"):
                    r[f"{key} gain"] = improvement(summary[new][key], summary[old][key], True)
                elif key.endswith("/multi_aspect_error") or key.endswith("/relative_residual"):
                    r[f"{key} reduction"] = improvement(summary[new][key], summary[old][key], False)
            out[f"{new} vs {old}"] = r
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x)):
        return f"{float(x):.2f}"
    return "–"


def _fmt_iv(x: Any, iv: Any) -> str:
    """"0.88 [0.83, 0.92]" (the value alone without an interval)."""
    if iv is None or len(iv) != 2 or any(v is None for v in iv):
        return _fmt(x)
    return f"{_fmt(x)} [{_fmt(iv[0])}, {_fmt(iv[1])}]"


def level_weight_series(result: Mapping[str, Any], group: str, method: str,
                        phrases: Optional[Mapping[str, str]] = None, intervals: bool = False) -> tuple:
    """``(levels, weights)`` per true concept of a single-aspect group of a benchmark result, for
    `persviz.finexl.plots.weight_vs_level`: each variant's known level and the method's weight on its true concept.

    intervals: return ``(levels, weights, weight_intervals)``, the third ``{concept: [(low, high), ...]}`` from the
    bootstrap over probes (None per point where the result has none); draw it with
    ``weight_vs_level(levels, weights, intervals=weight_intervals)``."""
    phrases = phrases or {}
    levels: dict[str, list] = {}
    weights: dict[str, list] = {}
    bounds: dict[str, list] = {}
    for row in result["variants"].values():
        if row["group"] != group:
            continue
        if len(row["truth"]) != 1:
            raise ValueError(f"group {group!r} holds a mixture ({row['truth']}); pass a single-aspect group")
        (word, level), = row["truth"].items()
        name = phrases.get(word, word)
        levels.setdefault(name, []).append(level)
        weights.setdefault(name, []).append(row["methods"][method]["weights"].get(word, 0.0))
        iv = (row["methods"][method].get("weight_intervals") or {}).get(word)
        bounds.setdefault(name, []).append(None if iv is None else (float(iv[0]), float(iv[1])))
    if not levels:
        raise ValueError(f"no variants of group {group!r} in the result")
    return (levels, weights, bounds) if intervals else (levels, weights)


def markdown_table(result: Mapping[str, Any]) -> str:
    """The summary as markdown: one row per method, one column per (group, metric)."""
    summary = result["summary"]
    cols = [("render_single", "top1"), ("render_single", "spearman"), ("render_mixture", "multi_aspect_error"),
            ("lora_single", "top1"), ("lora_single", "top1_realized"), ("lora_single", "spearman"), ("lora_mixture", "multi_aspect_error"),
            ("style_knob", "top1"), ("style_knob", "spearman"), ("render_single", "relative_residual"),
            ("lora_single", "relative_residual"), ("style_knob", "relative_residual")]
    cols = [c for c in cols if any(f"{c[0]}/{c[1]}" in s for s in summary.values())]
    head = "| method | " + " | ".join(f"{g} {k.replace('_', ' ')}" for g, k in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    ivs = (result.get("intervals") or {}).get("summary", {})
    for m, s in summary.items():
        iv = ivs.get(m, {})
        lines.append(f"| {m} | " + " | ".join(_fmt_iv(s.get(f'{g}/{k}'), iv.get(f'{g}/{k}')) for g, k in cols) + " |")
    return "\n".join(lines) + "\n"


def top1_table(result: Mapping[str, Any]) -> str:
    """The top-1 rates as markdown with both intervals: over probe prompts (bootstrap draws) and over the
    benchmark's items (its variants); "k/n" counts the variants."""
    iv = result.get("intervals") or {}
    keys = [k for k in ("render_single/top1", "lora_single/top1", "lora_single/top1_realized", "style_knob/top1")
            if any(k in s for s in result["summary"].values())]
    lines = ["| method | " + " | ".join(k.replace("/", " ").replace("_", " ") for k in keys) + " |",
             "|" + " --- |" * (len(keys) + 1)]
    for m, s in result["summary"].items():
        cells = []
        for k in keys:
            probe = (iv.get("summary", {}).get(m) or {}).get(k)
            item = (iv.get("top1_items", {}).get(m) or {}).get(k)
            text = _fmt_iv(s.get(k), probe)
            if item:
                hits = round(item["mean"] * item["n_prompts"])
                text += f"; {hits}/{item['n_prompts']} items [{_fmt(item['low'])}, {_fmt(item['high'])}]"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: A LoRA variant realizes its designed level when the oracle's held-out level is within this of it.
LEVEL_TOLERANCE = 0.1


def designed_vs_realized(result: Mapping[str, Any], tolerance: float = LEVEL_TOLERANCE) -> list[dict[str, Any]]:
    """One record per (LoRA variant, designed aspect): the designed level, the oracle's realized level on the
    benchmark's probes and seeds with its interval over probes (when the result has one), and whether it lies within
    ``tolerance`` of the design."""
    out = []
    for name, row in result["variants"].items():
        if not str(row.get("group", "")).startswith("lora_"):
            continue
        for a, p in row["rates"].items():
            r = row["realized"][a]
            iv = (row.get("realized_interval") or {}).get(a)
            out.append({"variant": name, "aspect": a, "designed": float(p), "realized": float(r),
                        "interval": iv, "within": bool(abs(float(r) - float(p)) <= tolerance)})
    return out


def designed_table(result: Mapping[str, Any], tolerance: float = LEVEL_TOLERANCE) -> str:
    """``designed_vs_realized`` as a markdown table, with the count within ``tolerance``."""
    recs = designed_vs_realized(result, tolerance)
    lines = ["| variant | aspect | designed | realized (oracle, held-out) | within |", "|---|---|---|---|---|"]
    for r in recs:
        iv = "" if not r["interval"] else f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
        lines.append(f"| {r['variant']} | {r['aspect']} | {r['designed']:.2f} | {r['realized']:.2f}{iv} | "
                     f"{'yes' if r['within'] else 'no'} |")
    n = sum(r["within"] for r in recs)
    lines += ["", f"{n} of {len(recs)} designed levels realized within {tolerance:g}."]
    return "\n".join(lines)


def vs_naive_lines(result: Mapping[str, Any], methods: Sequence[str] = ("finexl", "finexl_improved", "persviz"),
                   keys: Sequence[str] = ("lora_mixture/multi_aspect_error", "render_mixture/multi_aspect_error",
                                          "lora_single/top1")) -> list[str]:
    """Markdown lines: each method against naive on the same bootstrap draws (``paired_vs``): the point difference
    and its interval, and for errors the reduction (naive - method) / naive with its interval."""
    pv = (result.get("intervals") or {}).get("vs_naive") or {}
    if not pv:
        return []
    lines = ["Against naive, paired over the same draws of the probes (point value, then the 95 % interval):", ""]
    for m in methods:
        for k in keys:
            rec = pv.get(m, {}).get(k)
            if rec is None or m not in result["summary"] or k not in result["summary"][m]:
                continue
            d = result["summary"][m][k] - result["summary"]["naive"][k]
            text = f"- {m}, {k}: difference {d:+.2f} {_fmt_pair(rec['difference'])}"
            if "reduction" in rec:
                red = improvement(result["summary"][m][k], result["summary"]["naive"][k], False)
                text += f", reduction {red:+.0%} {_fmt_pair(rec['reduction'], pct=True)}"
            lines.append(text)
    return lines + [""]


def _fmt_pair(iv: Any, pct: bool = False) -> str:
    if not iv or iv[0] is None or not all(math.isfinite(float(x)) for x in iv):
        return "[–]"
    return f"[{iv[0]:+.0%}, {iv[1]:+.0%}]" if pct else f"[{iv[0]:+.2f}, {iv[1]:+.2f}]"


def markdown_report(result: Mapping[str, Any]) -> str:
    """`markdown_table` plus the improvement ratios beside the paper's claims."""
    lines = ["# FineXL ground-truth benchmark (ShapesWorld CLIP, 48 probes x 2 seeds)", "",
             "top1: the true concept has the highest positive weight; top1 realized: LoRA variants whose oracle level "
             f"is >= {MIN_REALIZED} only; spearman: rank agreement of the true concept's weight with the level, per "
             "concept, averaged; multi aspect error: sum |predicted - true level| / sum true level over the whole "
             "bank (predicted = weight / the method's weight for that aspect on the renderer at p = 1; false "
             "positives count); relative residual: |V_div - sum w f| / |V_div|, mean over the group. Renderer groups "
             "have exact levels, LoRA groups the oracle's realized levels.", ""]
    iv = result.get("intervals")
    if iv:
        lines += [f"Brackets: {iv['level']:.0%} percentile intervals over {iv['n_boot']} bootstrap draws of the "
                  f"{result['setup']['n_probes']} probe prompts (seeds nested in probes; seed {iv['seed']}): each draw "
                  "recomputes every V_div from the per-probe embedding differences (`benchmark_items.npz`) and reruns "
                  "every decomposition and metric (f(C) and the oracle's realized levels fixed).", ""]
    lines += [markdown_table(result), ""]
    if any(str(r.get("group", "")).startswith("lora_") for r in result["variants"].values()):
        lines += ["LoRA variants: designed level against the level the oracle reads on the benchmark's probes and "
                  "seeds (interval: 95 % over probes, seeds nested):", "", designed_table(result), ""]
    if iv:
        lines += ["Top-1 with both intervals: over probe prompts, then over the benchmark's items (the group's "
                  "variants, k/n correct; persviz.stats.bootstrap_mean):", "", top1_table(result), ""]
        lines += weight_interval_lines(result) + [""]
        lines += vs_naive_lines(result)
    lines += ["Improvement ratios (accuracy: relative gain; errors: relative reduction):", ""]
    for k, r in result["ratios"].items():
        keep = {kk: v for kk, v in r.items() if v is not None and ("top1" in kk or "multi" in kk or "spearman" in kk)}
        lines.append(f"- {k}: " + ", ".join(f"{kk} {v:+.2f}" for kk, v in keep.items()))
    lines += ["", "Methods (f(C): the paper's ', C' append or persviz's grammar-aware `shapesworld_compose`, one of "
              "persviz's improved ingredients; filter: e_ortho 0.03 over |cos| (paper) or over cos > 0 only "
              "(persviz, `positive_only`), or none; solver; greedy until e < 0.2):", ""]
    for m, spec in result["setup"]["methods"].items():
        if spec["solver"] == "naive":
            lines.append(f"- {m}: f(C) {spec['compose']}, the one concept of highest cos, weight = its projection")
            continue
        flt = "none" if spec["e_ortho"] is None else ("cos > 0" if spec["positive_only"] else "|cos|")
        lines.append(f"- {m}: f(C) {spec['compose']}, filter {flt}, solver {spec['solver']}")
    c = result["paper_claims"]
    lines += ["", f"Paper's claims against coarse baselines: single-aspect accuracy +{c['single_aspect_accuracy_gain']:.0%},"
              f" multi-aspect error at least {c['multi_aspect_error_reduction']:.0%} less.", ""]
    return "\n".join(lines)


def run(lora: bool = True, progress: bool = True, out_json: Path = BENCHMARK_JSON,
        out_md: Path = BENCHMARK_MD, out_items: Optional[Path] = BENCHMARK_ITEMS, n_boot: int = N_BOOT_BENCH,
        seed: int = BOOT_SEED) -> dict[str, Any]:
    """The whole benchmark: variants, methods, metrics, intervals over probe prompts (``n_boot`` draws; 0: none);
    writes the JSON, the markdown table and the per-item .npz (atomically)."""
    t0 = time.perf_counter()
    bench = Bench()
    variants = build_variants(bench, lora=lora, progress=progress)
    result = evaluate(bench, variants, progress=progress)
    t1 = time.perf_counter()
    if n_boot:
        result["intervals"] = bootstrap_benchmark(variants, result["variants"], bench.directions, n_boot=n_boot,
                                                  seed=seed, progress=progress)
        result["intervals"]["seconds"] = round(time.perf_counter() - t1, 1)
    if out_items is not None:
        save_items(out_items, variants, bench)
        result["items"] = {"file": Path(out_items).name, "diffs": "float32 [variants, probes, seeds, D]: "
                           "normalise(e_personal) - normalise(e_base) per pair; f_<composer> [bank, D]"}
    result["ratios"] = ratios(result["summary"])
    result["paper_claims"] = PAPER_CLAIMS
    result["setup"] = {"n_probes": N_PROBES, "probe_seed": PROBE_SEED, "seeds": list(SEEDS), "e_ortho": E_ORTHO,
                       "e_decomp": E_DECOMP, "bank": list(SHAPESWORLD_WORD_BANK), "encoder": "ShapesWorld CLIP",
                       "methods": {m: vars(s) for m, s in METHOD_SPECS.items()}, "n_boot": int(n_boot),
                       "boot_seed": int(seed), "seconds": round(time.perf_counter() - t0, 1)}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    result = to_jsonable(result)  # strict JSON, NaN as None: the returned result reads as the file does
    write_json(out_json, result)
    atomic_write_text(out_md, markdown_report(result))
    return result



"""The evaluation protocol (docs/evaluation.md): generated images grouped by (condition, prompt, seed) and the
concept's references in; per-image and per-prompt scores, means with nested bootstrap intervals over prompts and
paired differences between conditions out.

    ev = evaluate({"without": before, "with TEA": after}, probes, "circle", refs, clip, dino, oracle, signature,
                  repeats=2, concept="candy")
    ev.summary()["with TEA"]["clip_t_context"]        # Interval(mean, low, high, n_prompts, n_images)
    ev.compare("without", "with TEA")                   # {metric: Difference(..., p, p_holm)}, Holm across metrics
    ev.save("candy_tea.json"); Evaluation.load(...)     # per-image scores kept: everything can be re-analysed

Scores, DreamBench's way: CLIP-T of the full prompt, its concept part ("a <class word>") and its context part
(CLIPScore, 100 * max(cos, 0)); CLIP-I (x 100) and DINO-I (cosine) averaged over the whole reference set; on
ShapesWorld the oracle's concept and context reading (0 or 1 per image). The backbones, image size, scale and
counts are written into every result.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from persviz.io import PathLike, write_json
from persviz.metrics import as_images, clip_i, clip_t_parts, dino_i, oracle_checks
from persviz.stats import LEVEL, N_BOOT, Difference, Interval, bootstrap_mean, holm_table, paired_difference

METRICS = ("clip_t_full", "clip_t_concept", "clip_t_context", "clip_i", "dino_i", "oracle_concept", "oracle_context")
FORMAT = "persviz evaluation 1"
Probe = Mapping[str, Any]  # {'template': 'a {} on a black background', 'context': {...}, 'context_text': ...}


def describe_evaluator(evaluator: Any) -> Optional[str]:
    """What an evaluator is, for the record: 'facebook/dinov2-base (mean-pooled)', 'shapesworld clip', ..."""
    if evaluator is None:
        return None
    model = getattr(evaluator, "model", None)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(evaluator).__name__
    name = str(name)
    if "data/shapesworld/" in name.replace("\\", "/"):
        name = "shapesworld " + name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    pooling = getattr(evaluator, "pooling", None)
    if pooling is not None:
        name += " (mean-pooled)" if pooling == "mean" else " (CLS token)"
    return name


def fingerprint(images: np.ndarray) -> str:
    """A short sha256 of a uint8 image set (shape and bytes): which reference set a result was scored against."""
    images = np.ascontiguousarray(as_images(images, "references"))
    return hashlib.sha256(str(images.shape).encode() + images.tobytes()).hexdigest()[:16]


def score_per_image(images: np.ndarray, probes: Sequence[Probe], class_word: str, references: np.ndarray, clip: Any,
                    dino: Any = None, oracle: Any = None, signature: Optional[Mapping] = None,
                    repeats: int = 1) -> dict[str, np.ndarray]:
    """The protocol's scores of each image, float64 [N] by metric; images hold `repeats` images per probe,
    probe-major ([p0 s0, p0 s1, ..., p1 s0, ...]); the probes' {} is filled with the class word for CLIP-T."""
    images = as_images(images)
    if not probes:
        raise ValueError("no probes given; build them with persviz.shapesworld.concepts.eval_prompts")
    if len(images) != len(probes) * repeats:
        raise ValueError(f"{len(images)} images for {len(probes)} probes x {repeats} repeats")

    def rep(xs: list) -> list:
        return [x for x in xs for _ in range(repeats)]
    full = rep([p["template"].format(class_word) for p in probes])
    context = rep([p["context_text"] for p in probes])
    t = clip_t_parts(clip, images, full, f"a {class_word}", context)
    out = {f"clip_t_{k}": v.double().numpy() for k, v in t.items()}
    out["clip_i"] = clip_i(clip, images, references, percent=True).double().numpy()
    if dino is not None:
        out["dino_i"] = dino_i(dino, images, references).double().numpy()
    if oracle is not None:
        reads = [oracle_checks(oracle, images[i * repeats:(i + 1) * repeats], signature or {}, p["context"])
                 for i, p in enumerate(probes)]
        out["oracle_concept"] = np.concatenate([r["concept"] for r in reads]).astype(np.float64)
        out["oracle_context"] = np.concatenate([r["context"] for r in reads]).astype(np.float64)
    return out


@dataclass
class Evaluation:
    """Per-image scores of several conditions on shared prompts and seeds, and what they were scored with.

    items: {condition: {'prompt': [str], 'seed': [int], metric: [float], ...}} (one entry per image);
    meta: backbones, image size, scale, references, counts (what `evaluate` records)."""

    items: dict[str, dict[str, list]]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def conditions(self) -> list[str]:
        return list(self.items)

    def metrics(self, condition: Optional[str] = None) -> list[str]:
        """The metrics scored (of one condition, or those every condition has), in METRICS order."""
        conds = [condition] if condition else self.conditions
        have = set.intersection(*(set(self._cond(c)) for c in conds)) if conds else set()
        return [m for m in METRICS if m in have] + sorted(have - set(METRICS) - {"prompt", "seed"})

    def _cond(self, condition: str) -> dict[str, list]:
        if condition not in self.items:
            raise KeyError(f"no condition {condition!r}; this evaluation has {self.conditions}")
        return self.items[condition]

    def grouped(self, condition: str, metric: str) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
        """(prompts in first-seen order, per-prompt score arrays in seed order, their seeds) of one metric."""
        c = self._cond(condition)
        if metric not in c:
            raise KeyError(f"condition {condition!r} has no {metric!r}; it has {self.metrics(condition)}")
        by: dict[str, list[tuple[int, float]]] = {}
        for p, s, v in zip(c["prompt"], c["seed"], c[metric]):
            by.setdefault(p, []).append((int(s), float(v)))
        prompts = list(by)
        pairs = [sorted(by[p]) for p in prompts]
        return prompts, [np.array([v for _, v in ps]) for ps in pairs], [[s for s, _ in ps] for ps in pairs]

    def per_prompt(self, condition: str) -> list[dict[str, Any]]:
        """One row per prompt: its seeds and each metric's mean over them."""
        rows: dict[str, dict] = {}
        for m in self.metrics(condition):
            prompts, groups, seeds = self.grouped(condition, m)
            for p, g, s in zip(prompts, groups, seeds):
                rows.setdefault(p, {"prompt": p, "n_seeds": len(s)})[m] = float(g.mean())
        return list(rows.values())

    # ------------------------------------------------------------------ statistics
    def summary(self, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict[str, dict[str, Interval]]:
        """{condition: {metric: Interval}}: the mean over prompts (seeds nested) with its bootstrap interval."""
        return {c: {m: bootstrap_mean(self.grouped(c, m)[1], n_boot, level, seed) for m in self.metrics(c)}
                for c in self.conditions}

    def compare(self, a: str, b: str, metrics: Optional[Sequence[str]] = None, n_boot: int = N_BOOT,
                level: float = LEVEL, seed: int = 0) -> dict[str, Difference]:
        """b - a per metric on the prompts and seeds both share item by item: the mean difference, its nested
        bootstrap interval, the Wilcoxon p over prompts and Holm's p across these metrics."""
        metrics = list(metrics or [m for m in self.metrics() if m in self.metrics(a) and m in self.metrics(b)])
        out = {}
        for m in metrics:
            pa, ga, sa = self.grouped(a, m)
            pb, gb, sb = self.grouped(b, m)
            if pa != pb or sa != sb:
                only = sorted(set(pa) ^ set(pb))
                raise ValueError(f"conditions {a!r} and {b!r} do not hold the same prompts and seeds, so they cannot "
                                 f"be paired (e.g. {only[:2] or 'different seeds'}); generate both on the same grid")
            out[m] = paired_difference(ga, gb, n_boot, level, seed)
        return holm_table(out)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "meta": self.meta, "items": self.items}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Evaluation":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a persviz evaluation (format {data.get('format')!r}, expected {FORMAT!r})")
        return cls({c: dict(v) for c, v in data["items"].items()}, dict(data.get("meta", {})))

    def save(self, path: PathLike) -> Path:
        """Write the evaluation (per-image scores and meta) as JSON, atomically."""
        return write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: PathLike) -> "Evaluation":
        return cls.from_json(json.loads(Path(path).read_text()))


def probe_keys(probes: Sequence[Probe]) -> list[str]:
    """Each probe's prompt id: its template ('a {} on a white background'); a template drawn k > 1 times is k
    probes, each its own unit of the bootstrap ('... #2', '... #3'), as the probe set weighs it."""
    seen: dict[str, int] = {}
    keys = []
    for p in probes:
        t = p["template"].format("{}")
        seen[t] = seen.get(t, 0) + 1
        keys.append(t if seen[t] == 1 else f"{t} #{seen[t]}")
    return keys


def _counts(items: Mapping[str, Mapping[str, list]]) -> dict[str, dict[str, int]]:
    return {c: {"prompts": len(set(v["prompt"])), "images": len(v["prompt"])} for c, v in items.items()}


def evaluate(images: Mapping[str, np.ndarray], probes: Sequence[Probe], class_word: str, references: np.ndarray,
             clip: Any, dino: Any = None, oracle: Any = None, signature: Optional[Mapping] = None, repeats: int = 1,
             seeds: Optional[Sequence[int]] = None, concept: Optional[str] = None, scale: str = "shapesworld",
             expected_references: Optional[str] = None, prompt_ids: Optional[Sequence[str]] = None) -> Evaluation:
    """Score each condition's images (probe-major, `repeats` per probe) with score_per_image and keep them per image.

    seeds: the generation seed of each image (default: 0..repeats-1 within each prompt), the same for every
    condition so that conditions pair item by item. prompt_ids: each probe's id (default probe_keys(probes); pass
    probe_keys(all)[a:b] when `probes` is a slice of a larger probe set, so that ids do not depend on the slicing).
    expected_references: the fingerprint of the concept's own
    reference set (fingerprint(concept.reference_images())); a ValueError when `references` differ from it.
    An empty condition, or one whose image count does not fit probes x repeats, is an error naming it."""
    if not images:
        raise ValueError("no condition given; pass {condition name: images}")
    refs = as_images(references, "references")
    ref_id = fingerprint(refs)  # checked here, recorded by evaluation_meta
    if expected_references is not None and ref_id != expected_references:
        raise ValueError(f"the references given are not {concept or 'the concept'}'s own reference set (fingerprint "
                         f"{ref_id}, expected {expected_references}); pass concept.reference_images()")
    n = len(probes) * repeats
    seeds = list(seeds) if seeds is not None else [r for _ in probes for r in range(repeats)]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {len(probes)} probes x {repeats} repeats")
    ids = list(prompt_ids) if prompt_ids is not None else probe_keys(probes)
    if len(ids) != len(probes) or len(set(ids)) != len(ids):
        raise ValueError(f"prompt_ids must name each of the {len(probes)} probes once; got {len(ids)} "
                         f"({len(set(ids))} distinct)")
    prompts = [k for k in ids for _ in range(repeats)]
    if len(set(zip(prompts, seeds))) != n:
        raise ValueError("two images share a (prompt, seed); give each image of a prompt its own seed")
    items, size = {}, None
    for cond, ims in images.items():
        if ims is None or len(ims) == 0:
            raise ValueError(f"condition {cond!r} has no image; generate its {n} images or leave it out")
        ims = as_images(ims, f"images of {cond!r}")
        if len(ims) != n:
            raise ValueError(f"condition {cond!r} has {len(ims)} images for {len(probes)} probes x {repeats} "
                             f"repeats = {n}")
        size = size or list(ims.shape[1:3])
        scores = score_per_image(ims, probes, class_word, refs, clip, dino, oracle, signature, repeats)
        items[cond] = {"prompt": prompts, "seed": [int(s) for s in seeds],
                       **{k: [float(x) for x in v] for k, v in scores.items()}}
    return Evaluation(items, evaluation_meta(items, concept, class_word, scale, size, refs, clip, dino, oracle))


def evaluation_meta(items: Mapping[str, Mapping[str, list]], concept: Optional[str], class_word: str, scale: str,
                    image_size: Optional[list], references: np.ndarray, clip: Any, dino: Any = None,
                    oracle: Any = None) -> dict[str, Any]:
    """What every Evaluation records: concept, class word, scale, image size, backbones, the reference set (count and
    fingerprint), counts per condition and how the statistics are computed."""
    return {"concept": concept, "class_word": class_word, "scale": scale, "image_size": image_size,
            "backbones": {"clip": describe_evaluator(clip), "dino": describe_evaluator(dino),
                          "oracle": "shapesworld oracle" if oracle is not None else None},
            "references": {"count": int(len(references)), "fingerprint": fingerprint(references)},
            "counts": _counts(items), "protocol": protocol_note()}


def protocol_note(n_boot: int = N_BOOT, level: float = LEVEL) -> dict[str, Any]:
    """How the intervals and tests of an Evaluation are computed (written into results)."""
    return {"interval": f"percentile bootstrap {level:.0%}, {n_boot} seeded draws, prompts resampled and seeds "
                        "resampled within each drawn prompt", "mean": "mean over prompts of the mean over seeds",
            "test": "Wilcoxon signed-rank over per-prompt mean differences, two-sided; Holm across the metrics of "
                    "one comparison", "clip_i": "x 100, mean over the reference set", "dino_i": "cosine, mean over "
                    "the reference set", "clip_t": "100 * max(cos, 0)"}


def combine(evaluations: Mapping[str, Evaluation]) -> Evaluation:
    """Several concepts' evaluations as one: prompts become 'concept/prompt' (each a unit of the bootstrap), only the
    conditions every one has are kept; the references of each are recorded by concept."""
    if not evaluations:
        raise ValueError("no evaluation to combine")
    common = [c for c in next(iter(evaluations.values())).conditions if all(c in e.items for e in evaluations.values())]
    if not common:
        raise ValueError("the evaluations share no condition")
    items: dict[str, dict[str, list]] = {}
    for name, ev in evaluations.items():
        for c in common:
            src, dst = ev.items[c], items.setdefault(c, {})
            for k, v in src.items():
                dst.setdefault(k, []).extend([f"{name}/{p}" for p in v] if k == "prompt" else v)
    metrics = set.intersection(*(set(v) for v in items.values()))
    items = {c: {k: v[k] for k in v if k in metrics} for c, v in items.items()}
    first = next(iter(evaluations.values())).meta
    meta = {**{k: first.get(k) for k in ("scale", "image_size", "backbones", "protocol")},
            "concepts": {n: {k: e.meta.get(k) for k in ("concept", "class_word", "references")}
                         for n, e in evaluations.items()}, "counts": _counts(items)}
    return Evaluation(items, meta)


def interval_rows(ev: Evaluation, conditions: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None,
                  n_boot: int = N_BOOT, seed: int = 0, digits: int = 3) -> dict[str, dict[str, str]]:
    """{condition: {metric: 'mean [low, high]'}} for persviz.tables.table, with each condition's prompts x images."""
    summary = ev.summary(n_boot=n_boot, seed=seed)
    return {c: format_intervals({m: summary[c][m] for m in metrics or ev.metrics(c)}, digits)
            for c in conditions or ev.conditions}


def format_intervals(intervals: Mapping[str, Interval], digits: int = 3) -> dict[str, str]:
    """{metric: 'mean [low, high]'} and 'n': 'P prompts, N images' (of the first), one table row."""
    row = {m: f"{iv.mean:.{digits}g} [{iv.low:.{digits}g}, {iv.high:.{digits}g}]" for m, iv in intervals.items()}
    first = next(iter(intervals.values()))
    return {**row, "n": f"{first.n_prompts} prompts, {first.n_images} images"}


def difference_rows(diffs: Mapping[str, Difference], digits: int = 3) -> list[dict[str, Any]]:
    """One row per metric of a comparison, for persviz.tables.table."""
    return [{"metric": m, "difference": f"{d.mean:+.{digits}g}", "95 % interval": f"[{d.low:+.{digits}g}, {d.high:+.{digits}g}]",
             "p (Wilcoxon)": d.p, "p (Holm)": d.p_holm, "prompts": d.n_prompts, "holds": bool(d.p_holm < 0.05)}
            for m, d in diffs.items()]


__all__ = ["Evaluation", "FORMAT", "METRICS", "combine", "describe_evaluator", "difference_rows", "evaluate",
           "evaluation_meta", "fingerprint", "format_intervals", "interval_rows", "probe_keys", "protocol_note",
           "score_per_image"]

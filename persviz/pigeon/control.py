"""The perfect-mask control: could any history mask help Pigeon on this testbed? (docs/pigeon.md, "Finding (vi)").

Pigeon's learned mask added nothing over the unmasked history on token-level noise (docs/pigeon.md Sec. 12). That
says nothing about masks in general unless a mask that is known to be right helps. The control trains stage 1
with the ground truth's mask (``TrainConfig(perfect_mask=True)``: every distractor token zeroed, every taste
token read, at training and at inference; ``measures.truth_keep_mask``) and compares, on the same held-out
windows and latents, the rows of ``CONTROL_ROWS``:

- "perfect": the perfect-mask model read with the perfect mask;
- "baseline": the trained baseline (every history token, same losses, data, steps and learning rate);
- "stage1": Pigeon's stage 1 with its learned mask;
- "stage1_keep": stage 1's module reading every history token (the unmasked history);
- "perfect_keep": the perfect-mask model reading every history token (what the mask changes at inference);
- "stage1_truth_budget": stage 1's module with the best mask of its budget (``measures.perfect_keep_mask``:
  as many tokens per image as its own mask keeps, distractor tokens dropped first).

Each row is generated with Pigeon's test-time ratio selection (``study.generate_and_score``) and scored by CLIP,
DINO and the attribute oracle per window; ``COMPARISONS`` are the paired differences (row minus reference, per
metric: mean, bootstrap interval over windows, Wilcoxon p, Holm's p across the metrics of that comparison), and
the learned mask gets ``study.mask_measures`` (kept-noise share, score AUC against the ground truth).

Usage (or ``persviz pigeon control``)::

    rows = control_table({"perfect": "data/pigeon/token/perfect", "baseline": "data/pigeon/token/baseline",
                          "stage1": "data/pigeon/token/stage1"}, n_windows=96, noise_rates=(0.2, 0.4),
                         regime="token", path="data/pigeon/token/control.json")
    print(format_control(rows))
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from persviz.constants import TOKEN_REGIMES
from persviz.io import PathLike, write_json
from persviz.pigeon.model import RATIOS, PigeonPipeline
from persviz.pigeon.study import (METRICS, ROW_LABELS, default_evaluators, generate_and_score, heldout_dataset,
                                  load_stage, mask_measures, paired_differences, pick_windows, training_data_settings,
                                  with_intervals)
from persviz.stats import LEVEL, N_BOOT

#: The control's rows: key -> (label, the model it uses, how it reads the history: ``study.READ_MODES``).
CONTROL_ROWS: dict[str, tuple[str, str, str]] = {
    "baseline": (ROW_LABELS["baseline"], "baseline", "keep"),
    "stage1": ("Pigeon stage 1 (learned mask)", "stage1", "mask"),
    "stage1_keep": ("Pigeon stage 1, every history token", "stage1", "keep"),
    "stage1_truth_budget": ("Pigeon stage 1, perfect mask at its budget", "stage1", "truth_budget"),
    "perfect": ("perfect mask (trained and read with the ground truth)", "perfect", "truth"),
    "perfect_keep": ("perfect-mask model, every history token", "perfect", "keep"),
}
#: The paired comparisons, (row, reference): row minus reference. The first three are the pre-registered ones
#: (docs/pigeon.md, "Finding (vi)"); the others say where a difference comes from.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("perfect", "baseline"), ("stage1", "baseline"), ("stage1", "perfect"),
    ("perfect", "stage1_keep"), ("perfect", "perfect_keep"), ("stage1_truth_budget", "stage1"),
    ("stage1", "stage1_keep"))
#: The pre-registered primary metric: the whole taste read by the oracle wherever the object stands.
PRIMARY = "any_taste"


def control_table(models: Mapping[str, PigeonPipeline | PathLike], n_windows: int,
                  noise_rates: Sequence[float] = (0.2, 0.4), regime: str = "token",
                  rows: Sequence[str] | None = None, split: str = "test", clip: Any = None, dino: Any = None,
                  oracle: Any = None, seed: int = 0, batch_size: int = 8, num_inference_steps: int = 25,
                  guidance_scale: float = 4.0, ratios: Sequence[float] = RATIOS, path: PathLike | None = None,
                  progress: bool = True, n_boot: int = N_BOOT, level: float = LEVEL) -> list[dict[str, Any]]:
    """The control's rows on held-out users, per noise rate, with the paired ``COMPARISONS``.

    Args:
        models: {"perfect", "baseline", "stage1"} -> PigeonPipeline or weights folder (a row whose model is missing
            is left out, and so are the comparisons that need it). The first folder's config.json gives the users.
        n_windows: windows per noise rate (``study.pick_windows``).
        noise_rates: token-level noise rates of the held-out users (``study.heldout_dataset``).
        regime: "token" or "decoy" (regimes with distractor tokens).
        rows: the row keys (default: every row of ``CONTROL_ROWS`` whose model is given).
        split, clip, dino, oracle, seed, batch_size, num_inference_steps, guidance_scale, ratios: as in
            ``study.comparison_table`` (the latents of the batch starting at window j come from ``seed + j``).
        path: the JSON file to write ({"settings", "rows"}); ``<path>.partial`` keeps finished (rate, row) blocks
            so an interrupted run resumes (same settings only).
        n_boot, level: the bootstrap.

    Returns:
        One dict per (noise rate, row) as ``study.comparison_table``'s, with "intervals", f"vs_{reference}" for
        each comparison the row is the first of, and on the "stage1" row "masks" (``study.mask_measures``).
    """
    if regime not in TOKEN_REGIMES:
        raise ValueError(f"regime={regime!r}: the control needs distractor tokens; use one of {TOKEN_REGIMES}")
    unknown = sorted(set(models) - {m for _, m, _ in CONTROL_ROWS.values()})
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; use 'perfect', 'baseline' and 'stage1'")
    keys = [k for k, (_, m, _) in CONTROL_ROWS.items() if m in models] if rows is None else list(rows)
    for k in keys:
        if k not in CONTROL_ROWS:
            raise ValueError(f"unknown row {k!r}; choose from {list(CONTROL_ROWS)}")
        if CONTROL_ROWS[k][1] not in models:
            raise ValueError(f"row {k!r} needs the {CONTROL_ROWS[k][1]!r} model; pass it in models")
    if not keys:
        raise ValueError("no row to compute; pass models")
    first = next(iter(models.values()))
    settings = training_data_settings(first if not isinstance(first, PigeonPipeline) else None)
    pipes: dict[str, PigeonPipeline] = {}
    sd = None
    for name, w in models.items():
        pipes[name] = load_stage(w, sd=sd, name=name)
        sd = pipes[name].sd
    clip, dino, oracle = default_evaluators(clip, dino, oracle)
    data = []
    for rate in noise_rates:
        ds = heldout_dataset(rate, split, settings["n_users"], settings["data_seed"], settings["n_interactions"],
                             regime)
        data.append((float(rate), ds, pick_windows(ds, min(int(n_windows), len(ds)))))
    run_settings = {"n_windows": int(n_windows), "noise_rates": [float(r) for r in noise_rates], "split": split,
                    "seed": seed, "batch_size": batch_size, "num_inference_steps": num_inference_steps,
                    "guidance_scale": guidance_scale, "ratios": [float(r) for r in ratios], "regime": regime,
                    "rows": keys, **settings,
                    "models": {k: (str(v) if not isinstance(v, PigeonPipeline) else "pipeline")
                               for k, v in models.items()}}
    partial = None if path is None else Path(path).with_name(Path(path).name + ".partial")
    key = json.dumps(run_settings)
    done: dict[tuple[float, str], dict[str, Any]] = {}
    if partial is not None and partial.is_file():
        rec = json.loads(partial.read_text())
        if rec.get("key") == key:
            done = {(float(r["noise_rate"]), r["key"]): r for r in rec["rows"]}
    out: list[dict[str, Any]] = []
    total = sum(math.ceil(len(idx) / batch_size) for _, _, idx in data) * len(keys)
    bar = tqdm(total=total, desc="perfect-mask control", disable=not progress)
    try:
        for rate, ds, idx in data:
            for k in keys:
                if (rate, k) in done:
                    out.append(done[(rate, k)])
                    bar.update(math.ceil(len(idx) / batch_size))
                    continue
                label, model, mode = CONTROL_ROWS[k]
                bar.set_postfix(noise=rate, row=k)
                scores, counts = generate_and_score(pipes[model], mode, ds, idx, clip, dino, oracle, seed=seed,
                                                    batch_size=batch_size, num_inference_steps=num_inference_steps,
                                                    guidance_scale=guidance_scale, ratios=ratios, bar=bar)
                row = {"noise_rate": rate, "row": label, "key": k, "model": model, "read": mode, **scores,
                       "ratio_counts": {f"{r:g}": c for r, c in zip(ratios, counts)}}
                if mode == "mask":
                    row["masks"] = mask_measures(pipes[model], ds, idx, batch_size=batch_size, n_boot=n_boot,
                                                 level=level)
                out.append(row)
                if partial is not None:
                    write_json(partial, {"key": key, "rows": out})
    finally:
        bar.close()
    out = with_intervals(out, n_boot, level)
    for row_key, ref in COMPARISONS:
        if row_key in keys and ref in keys:
            out = paired_differences(out, against=ref, compared=(row_key,), n_boot=n_boot, level=level)
    if path is not None:
        write_json(path, {"settings": {**run_settings, "n_boot": int(n_boot), "level": float(level),
                                       "intervals": "bootstrap over windows (one image per window), persviz.stats",
                                       "comparisons": [list(c) for c in COMPARISONS],
                                       "primary": PRIMARY},
                          "rows": out})
        if partial is not None and partial.is_file():
            partial.unlink()
    return out


def comparison_rows(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = (PRIMARY,)
                    ) -> list[dict[str, Any]]:
    """Flat records of every paired comparison present in the rows: noise rate, row, reference, metric, mean, low,
    high, p, p_holm (Holm across the 12 metrics of that comparison), n."""
    out = []
    for r in rows:
        for f, d in r.items():
            if not f.startswith("vs_") or not isinstance(d, Mapping):
                continue
            for m in metrics:
                if m in d:
                    x = d[m]
                    out.append({"noise_rate": float(r["noise_rate"]), "row": r["key"], "reference": f[3:],
                                "metric": m, "mean": x["mean"], "low": x["low"], "high": x["high"], "p": x["p"],
                                "p_holm": x["p_holm"], "n": x["n_prompts"]})
    return out


#: The pre-registered level of Holm's p: 0.05 split over the two noise rates.
ALPHA = 0.025


def holds(d: Mapping[str, Any], alpha: float = ALPHA) -> bool:
    """The pre-registered criterion of a difference: positive, its interval above 0 and Holm's p below ``alpha``."""
    return bool(d["mean"] > 0 and d["low"] > 0 and math.isfinite(d["p_holm"]) and d["p_holm"] < alpha)


def format_control(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = (PRIMARY, "any_color", "any_texture",
                                                                                   "clip_i", "clip_t")) -> str:
    """Two markdown tables: every row's metrics ("mean [low, high]") and every comparison on ``metrics``
    ("difference [low, high], p (Holm p)")."""
    if not rows:
        raise ValueError("no rows; run control_table first")
    labels = {k: lab for k, lab, _ in METRICS}
    lines = ["| noise | row | n | " + " | ".join(labels.get(m, m) for m in metrics) + " |",
             "|" + "---|" * (3 + len(metrics))]
    for r in rows:
        cells = []
        for m in metrics:
            iv = (r.get("intervals") or {}).get(m)
            cells.append("–" if iv is None else f"{iv['mean']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]")
        lines.append(f"| {r['noise_rate']:g} | {r['row']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "| noise | row minus reference | " + " | ".join(labels.get(m, m) for m in metrics) + " |",
              "|" + "---|" * (2 + len(metrics))]
    for r in rows:
        for f, d in r.items():
            if not f.startswith("vs_") or not isinstance(d, Mapping):
                continue
            cells = []
            for m in metrics:
                x = d.get(m)
                cells.append("–" if x is None else f"{x['mean']:+.2f} [{x['low']:+.2f}, {x['high']:+.2f}], "
                                                   f"p={x['p']:.2g} (Holm {x['p_holm']:.2g})")
            lines.append(f"| {r['noise_rate']:g} | {r['key']} − {f[3:]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ALPHA", "COMPARISONS", "CONTROL_ROWS", "PRIMARY", "comparison_rows", "control_table", "format_control", "holds"]

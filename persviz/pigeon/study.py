"""Pigeon's studies on ShapesWorld: the comparison table, what the mask generator keeps, stage-2 pairs.

- ``comparison_table``: held-out users at fixed noise rates; four rows ("reference only (no history)",
  "history without masks", "Pigeon stage 1", "Pigeon stage 2"), all with the paper's test-time ratio
  selection and the same initial latents; personalization (CLIP-I and DINO-I to the history x100, the
  oracle's taste hit rates) and semantic alignment (CLIP-T to the instruction, the oracle's shape accuracy).
- ``kept_noise_fraction`` / ``kept_noise_by_rate``: which history tokens the mask generator keeps, against
  the ground truth of which history images are noise.
- ``mask_measures``: at token-level noise (users regime "token"), the kept-noise share of Pigeon's history mask
  against a perfect mask and chance, and the AUC of its scores against the per-token ground truth, with
  bootstrap intervals over windows (``comparison_table`` attaches them to the stage rows as "masks").
- ``history_mode``: switch the history off ("none") or its masking off ("keep") for a block.
- ``window_masks``, ``pair_examples``: the inputs of ``persviz.pigeon.plots``.

Pigeon exists here at ShapesWorld scale only: at full scale (``PERSVIZ_SCALE=full``) it would need LaVIT-7B and
SDXL (github ``YiyanXu/Pigeon``), which persviz neither ships nor loads; ``require_shapesworld`` says so.

Token-level noise (``persviz pigeon study --regime token``): the stage-1 run's regime is read from its config.json;
with ``baseline=`` (the trained baseline, ``persviz pigeon train --stage baseline``) the table gets a
"trained baseline" row and the stage rows a paired difference against it ("vs_baseline").

Usage (or ``persviz pigeon study --n-windows 50``, which writes data/pigeon/comparison.json)::

    s1 = PigeonPipeline.from_shapesworld(weights="data/pigeon/stage1")
    s2 = PigeonPipeline.from_shapesworld(weights="data/pigeon/stage2", sd=s1.sd)
    rows = comparison_table(s1, s2, n_windows=50, path="data/pigeon/comparison.json")
    print(format_table(rows))
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from persviz.constants import TOKEN_REGIMES
from persviz.errors import PersvizError
from persviz.images import as_uint8
from persviz.io import PathLike, load_state, write_json
from persviz.loading import load_evaluator
from persviz.paths import DATA_DIR
from persviz.pigeon.mask import HISTORY_TYPE, REFERENCE_TYPE, gumbel_topk_mask
from persviz.pigeon.measures import perfect_keep_mask, token_auc, truth_keep_mask, window_measures
from persviz.pigeon.model import HISTORY_MODES, RATIOS, WEIGHTS_FILE, PigeonPipeline
from persviz.pigeon.train import PAIRS_FILE
from persviz.pigeon.users import (REGIMES, PigeonDataset, as_image_tensor, make_datasets, taste_report,
                                  validate_request)
from persviz.stats import LEVEL, N_BOOT, bootstrap_mean, holm_table, paired_difference

PIGEON_DIR = DATA_DIR / "pigeon"
#: The comparison's rows: key -> label (the paper's baselines at ShapesWorld scale, then the two stages).
ROWS = {"no_history": "reference only (no history)", "no_mask": "history without masks",
        "stage1": "Pigeon stage 1", "stage2": "Pigeon stage 2"}
#: Metrics of a comparison row: (key, label, group).
METRICS = (("clip_i", "CLIP-I to history (x100)", "personalization"),
           ("dino_i", "DINO-I to history (x100)", "personalization"),
           ("taste", "oracle: whole taste", "personalization"),
           ("color", "oracle: favourite color", "personalization"),
           ("texture", "oracle: texture", "personalization"),
           ("background", "oracle: background", "personalization"),
           ("clip_t", "CLIP-T to instruction (x100)", "semantic alignment"),
           ("shape", "oracle: requested shape", "semantic alignment"),
           ("any_taste", "oracle, object anywhere: whole taste", "personalization"),
           ("any_color", "oracle, object anywhere: favourite color", "personalization"),
           ("any_texture", "oracle, object anywhere: texture", "personalization"),
           ("any_shape", "oracle, object anywhere: requested shape", "semantic alignment"))
#: Rows compared against the unmasked history (``paired_differences``): each stage minus "history without masks".
BASELINE = "no_mask"
COMPARED = ("stage1", "stage2")
#: The trained baseline's row key (``comparison_table(baseline=...)``); the stage rows are also paired against it.
TRAINED_BASELINE = "baseline"
#: Every row's label: ``ROWS`` and the trained baseline's (a row only when ``comparison_table`` gets one).
ROW_LABELS = {"no_history": ROWS["no_history"], "no_mask": ROWS["no_mask"],
              TRAINED_BASELINE: "trained baseline (every history token)", "stage1": ROWS["stage1"],
              "stage2": ROWS["stage2"]}
#: The mask measures (``mask_measures``): key -> label.
MASK_MEASURES = {"kept_noise_share": "kept-noise share, Pigeon's mask", "perfect": "kept-noise share, perfect mask",
                 "chance": "kept-noise share, chance", "score_auc": "score AUC, taste over distractor tokens"}
#: The oracle's strict reading looks in the target's slot (the reference's position); the "any_" columns judge
#: the generated object wherever it stands, separating the taste from placing the object where the reference has it.
#: The first chunk of a run's stage-2 pairs, shipped for the figures (pairs.pt itself is not).
PAIRS_SAMPLE_FILE = "pairs_sample.pt"
#: Noise rates of the kept-noise study.
NOISE_SWEEP = (0.0, 0.2, 0.4, 0.6)
#: The training data's defaults (``train.TrainConfig``): test users are held out of the same 1000.
DATA_DEFAULTS = {"n_users": 1000, "data_seed": 0, "n_interactions": 12}


class FullScaleNotSupportedError(PersvizError, RuntimeError):
    """Pigeon runs on ShapesWorld only; full scale needs LaVIT + SDXL."""


def require_shapesworld(scale: str) -> None:
    """Raise FullScaleNotSupportedError at scale 'full' (Pigeon exists here at ShapesWorld scale only); notebook 04
    passes its session's scale. The library's own functions always work on ShapesWorld, whatever PERSVIZ_SCALE says."""
    if scale == "full":
        raise FullScaleNotSupportedError(
            "PERSVIZ_SCALE=full, but Pigeon cannot run at full scale in persviz: the paper's model is LaVIT-7B with an "
            "SDXL decoder (github YiyanXu/Pigeon), which persviz neither ships nor loads, and no ShapesWorld Pigeon "
            "result would mean anything for SD 1.5. Unset PERSVIZ_SCALE (or set it to 'shapesworld') to run the "
            "ShapesWorld Pigeon.")


# ----------------------------------------------------------------------------- models and data


def load_stage(weights: PigeonPipeline | PathLike, sd: Any = None, name: str = "weights") -> PigeonPipeline:
    """A PigeonPipeline: returned as is, or loaded from a weights folder (sharing ``sd`` when given)."""
    if isinstance(weights, PigeonPipeline):
        return weights
    folder = Path(weights).expanduser()
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{name}: no {WEIGHTS_FILE} in {folder}; train it with `persviz pigeon train --stage N --out "
            f"{folder}` (it is written when the stage finishes), or pass another folder")
    return PigeonPipeline.from_shapesworld(weights=folder, sd=sd)


def training_data_settings(folder: PathLike | None = None) -> dict[str, int]:
    """n_users, data_seed, n_interactions of the run in ``folder`` (its config.json), else the training defaults."""
    out = dict(DATA_DEFAULTS)
    if folder is not None and (Path(folder) / "config.json").is_file():
        rec = json.loads((Path(folder) / "config.json").read_text())
        out.update({k: int(rec[k]) for k in DATA_DEFAULTS if k in rec})
    return out


def training_regime(folder: PathLike | None = None) -> str:
    """The noise regime of the run in ``folder`` (its config.json; runs written before regimes existed: "image")."""
    if folder is not None and (Path(folder) / "config.json").is_file():
        return str(json.loads((Path(folder) / "config.json").read_text()).get("regime", "image"))
    return "image"


def heldout_dataset(noise_rate: float, split: str = "test", n_users: int = DATA_DEFAULTS["n_users"],
                    data_seed: int = DATA_DEFAULTS["data_seed"],
                    n_interactions: int = DATA_DEFAULTS["n_interactions"], regime: str = "image") -> PigeonDataset:
    """The ``split`` users of the training population, every one at ``noise_rate`` (of the ``regime``: whole noise
    images for "image", distractor tokens for "token").

    Splits depend only on (n_users, data_seed), and a user's taste on (data_seed, user_id), so with the training
    run's settings these are the same held-out users with the same tastes; only the noise rate (and so their
    interaction sequence) is fixed here.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}; use 'test' (held-out users), 'val' or 'train'")
    sets = make_datasets(n_users, data_seed, float(noise_rate), n_interactions, regime=regime)
    if split not in sets:
        raise ValueError(f"the {split!r} split of {n_users} users is empty; use more users")
    return sets[split]


def pick_windows(dataset: PigeonDataset, n: int) -> list[int]:
    """``n`` window indices spread over the users: every user's first window, then every user's second, ..."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n_windows must be a positive int; got {n!r}")
    rank: dict[int, int] = {}
    keyed = []
    for i, w in enumerate(dataset.windows):
        r = rank.get(w.user_id, 0)
        rank[w.user_id] = r + 1
        keyed.append((r, w.user_id, i))
    if n > len(keyed):
        raise ValueError(f"n_windows={n} but the dataset has {len(keyed)} windows; pass n_windows <= {len(keyed)}")
    return sorted(i for _, _, i in sorted(keyed)[:n])


@contextlib.contextmanager
def history_mode(pipe: PigeonPipeline, mode: str) -> Iterator[PigeonPipeline]:
    """Within the block the model treats the history as ``mode`` ("mask", "keep" or "none"; see
    ``model.HISTORY_MODES``); restored on exit."""
    if mode not in HISTORY_MODES:
        raise ValueError(f"mode={mode!r}; use one of {HISTORY_MODES}")
    model = pipe.model
    before = model.history_mode
    model.history_mode = mode
    try:
        yield pipe
    finally:
        model.history_mode = before


@contextlib.contextmanager
def _eval_mode(pipe: PigeonPipeline) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, as ``PigeonPipeline.__call__`` runs it."""
    was = pipe.model.training
    pipe.model.eval()
    try:
        yield
    finally:
        pipe.model.train(was)


# ----------------------------------------------------------------------------- the comparison table


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per request i: 100 x mean_j cos(a[i], b[i, j]) for unit a [N, D], b [N, H, D]."""
    return (100.0 * torch.einsum("nd,nhd->nh", a.float(), b.float()).mean(-1)).numpy()


def score_generations(images: np.ndarray, histories: np.ndarray, windows: Sequence[Any], clip: Any, dino: Any,
                      oracle: Any, per_item: bool = False) -> dict[str, Any]:
    """Personalization and semantic alignment of generated images, one per window.

    Args:
        images: uint8 [N, S, S, 3] generated images.
        histories: uint8 [N, H, S, S, 3] their histories.
        windows: the N ``users.Window`` ground truths (instruction, taste, target slot).
        clip, dino, oracle: ``persviz.loading.load_evaluator`` of kinds "clip", "dino", "oracle".

        per_item: also return "items": {metric: [score of each window]} (CLIP / DINO scores x100, the oracle's
            0/1 hits); the means are their means.

    Returns:
        {metric: mean} for every key of ``METRICS``, "{metric}_sem" for the CLIP / DINO scores, and "n".
    """
    n, h = histories.shape[:2]
    if len(images) != n or len(windows) != n or n == 0:
        raise ValueError(f"{len(images)} images, {n} histories and {len(windows)} windows; "
                         f"pass one of each per request")
    flat = histories.reshape(n * h, *histories.shape[2:])
    out: dict[str, Any] = {"n": int(n)}
    items: dict[str, list[float]] = {}
    for key, ev in (("clip_i", clip), ("dino_i", dino)):
        v = _mean_cos(ev.embed_images(images), ev.embed_images(flat).view(n, h, -1))
        out[key], out[f"{key}_sem"] = float(v.mean()), _sem(v)
        items[key] = v.astype(np.float64).tolist()
    from persviz.metrics import clip_t  # heavy: persviz.metrics imports diffusers (the oracle)

    ct = clip_t(clip, images, [w.instruction for w in windows]).numpy()
    out["clip_t"], out["clip_t_sem"] = float(ct.mean()), _sem(ct)
    items["clip_t"] = ct.astype(np.float64).tolist()
    readings = oracle.read(images)
    out.update(taste_report(readings, windows))
    out.update({f"any_{k}": v for k, v in taste_report(readings, windows, anywhere=True).items()
                if k in ("taste", "color", "texture", "shape")})
    if per_item:
        hits = [taste_report([r], [w]) for r, w in zip(readings, windows)]  # one window at a time: 0/1 hits
        hits_any = [taste_report([r], [w], anywhere=True) for r, w in zip(readings, windows)]
        for k in ("shape", "color", "texture", "background", "taste", "all"):
            items[k] = [float(x[k]) for x in hits]
        for k in ("taste", "color", "texture", "shape"):
            items[f"any_{k}"] = [float(x[k]) for x in hits_any]
        out["items"] = items
    return out


def default_evaluators(clip: Any, dino: Any, oracle: Any) -> tuple[Any, Any, Any]:
    """The given evaluators, each None replaced by the ShapesWorld one (``load_evaluator``)."""
    return (clip if clip is not None else load_evaluator(kind="clip"),
            dino if dino is not None else load_evaluator(kind="dino"),
            oracle if oracle is not None else load_evaluator(kind="oracle"))


def comparison_table(stage1: PigeonPipeline | PathLike, stage2: PigeonPipeline | PathLike | None, n_windows: int,
                     noise_rates: Sequence[float] = (0.0, 0.2, 0.4), split: str = "test",
                     clip: Any = None, dino: Any = None, oracle: Any = None, seed: int = 0, batch_size: int = 8,
                     num_inference_steps: int = 25, guidance_scale: float = 4.0,
                     ratios: Sequence[float] = RATIOS, n_users: int | None = None, data_seed: int | None = None,
                     path: PathLike | None = None, progress: bool = True, n_boot: int = N_BOOT,
                     level: float = LEVEL, baseline: PigeonPipeline | PathLike | None = None,
                     regime: str | None = None) -> list[dict[str, Any]]:
    """Pigeon against its ablations on held-out users, per noise rate (the paper's main table at ShapesWorld scale).

    Rows (``ROWS``), each with test-time ratio selection (``PigeonPipeline.select``) from the same latents:
    "reference only (no history)" (stage 1, every history token zeroed and masked: it reads the reference and
    the instruction only), "history without masks" (stage 1, history mask ratio 0), "Pigeon stage 1",
    "Pigeon stage 2" (left out when ``stage2`` is None), and with ``baseline`` "trained baseline (every history
    token)" (that run's weights, every history token read, as it was trained).

    Args:
        stage1, stage2: PigeonPipelines or weights folders (stage 2 loads with stage 1's diffusion pipeline).
        n_windows: windows per noise rate (``pick_windows``: spread over the users).
        noise_rates: one held-out dataset per rate (``heldout_dataset``), every user at that rate.
        split: "test" (held-out users; default), "val" or "train".
        clip, dino, oracle: evaluators (default: the ShapesWorld ones).
        seed: latents of batch starting at window j are drawn from ``seed + j`` (the same for every row).
        batch_size, num_inference_steps, guidance_scale, ratios: generation settings.
        n_users, data_seed: the user population (default: stage 1's training run, else 1000 users, seed 0).
        path: if given, {"settings", "rows"} is written there as JSON (atomically). The run resumes: each finished
            (noise rate, row) block is kept in ``<path>.partial`` (same settings and weights only) until the table
            is written.
        progress: a tqdm bar.
        n_boot, level: the bootstrap of the intervals (``with_intervals``, ``paired_differences``).
        baseline: the trained baseline (``persviz pigeon train --stage baseline``): a PigeonPipeline or folder.
        regime: the held-out users' noise, "image" or "token"; None: stage 1's training regime (its config.json).
            At "token" the stage rows carry "masks" (``mask_measures`` of stage 1's mask generator on the same
            windows; stage 2 trains only the personalization module, so its masks are stage 1's).

    Returns:
        One dict per (noise rate, row): "noise_rate", "row" (label), "key", "n", the metrics of ``METRICS``
        (means; CLIP / DINO scores also "{key}_sem"), "ratio_counts" {ratio: times selected}, "items" (the
        windows' dataset indices and every metric's per-window scores), "intervals" {metric: mean, low, high,
        n_prompts (windows), n_images, level} and, on the stage rows, "vs_no_mask" {metric: the paired
        difference stage - history without masks with its interval, Wilcoxon p and Holm's p across the metrics}
        (with a baseline also on its row, and "vs_baseline" on the stage rows: stage - trained baseline).
    """
    for name, v in (("n_windows", n_windows), ("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if not len(noise_rates):
        raise ValueError("noise_rates is empty; pass e.g. (0.0, 0.2, 0.4)")
    settings = training_data_settings(stage1 if not isinstance(stage1, PigeonPipeline) else None)
    if n_users is not None:
        settings["n_users"] = int(n_users)
    if data_seed is not None:
        settings["data_seed"] = int(data_seed)
    if regime is None:
        regime = training_regime(stage1 if not isinstance(stage1, PigeonPipeline) else None)
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r}; use 'image' (whole noise images) or 'token' (distractor tokens)")
    p1 = load_stage(stage1, name="stage1")
    p2 = load_stage(stage2, sd=p1.sd, name="stage2") if stage2 is not None else None
    pb = load_stage(baseline, sd=p1.sd, name="baseline") if baseline is not None else None
    clip, dino, oracle = default_evaluators(clip, dino, oracle)
    runs = [("no_history", p1, "none"), ("no_mask", p1, "keep")]
    if pb is not None:
        runs.append((TRAINED_BASELINE, pb, "keep"))
    runs.append(("stage1", p1, "mask"))
    if p2 is not None:
        runs.append(("stage2", p2, "mask"))
    data = []
    for rate in noise_rates:
        ds = heldout_dataset(rate, split, settings["n_users"], settings["data_seed"], settings["n_interactions"],
                             regime)
        data.append((float(rate), ds, pick_windows(ds, min(int(n_windows), len(ds)))))
    total = sum(math.ceil(len(idx) / batch_size) for _, _, idx in data) * len(runs)
    run_settings = {"n_windows": int(n_windows), "noise_rates": [float(r) for r in noise_rates], "split": split,
                    "seed": seed, "batch_size": batch_size, "num_inference_steps": num_inference_steps,
                    "guidance_scale": guidance_scale, "ratios": [float(r) for r in ratios], **settings,
                    "stage1": str(stage1) if not isinstance(stage1, PigeonPipeline) else "pipeline",
                    "stage2": (None if stage2 is None else str(stage2)
                               if not isinstance(stage2, PigeonPipeline) else "pipeline")}
    if pb is not None or regime != "image":  # (keys absent from the image-regime tables written before them)
        run_settings.update(regime=regime, baseline=(None if baseline is None else str(baseline)
                                                     if not isinstance(baseline, PigeonPipeline) else "pipeline"))
    partial = None if path is None else Path(path).with_name(Path(path).name + ".partial")
    weights = [_weights_stamp(w) for w in (stage1, stage2)] + ([_weights_stamp(baseline)] if pb is not None else [])
    resume_key = json.dumps({**run_settings, "weights": weights})
    done = _read_partial(partial, resume_key)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="comparison table", disable=not progress)
    try:
        for rate, ds, idx in data:
            windows = [ds.window(i) for i in idx]
            histories = np.stack([ds.images(i)["history"] for i in idx])
            for key, pipe, mode in runs:
                if (rate, key) in done:  # finished by an interrupted call with the same settings and weights
                    rows.append(done[(rate, key)])
                    bar.update(math.ceil(len(idx) / batch_size))
                    continue
                bar.set_postfix(noise=rate, row=key)
                scores, counts = generate_and_score(pipe, mode, ds, idx, clip, dino, oracle, seed=seed,
                                                    batch_size=batch_size, num_inference_steps=num_inference_steps,
                                                    guidance_scale=guidance_scale, ratios=ratios,
                                                    histories=histories, windows=windows, bar=bar)
                row = {"noise_rate": rate, "row": ROW_LABELS[key], "key": key, **scores,
                       "ratio_counts": {f"{r:g}": c for r, c in zip(ratios, counts)}}
                if regime in TOKEN_REGIMES and key in COMPARED:
                    # stage 2 freezes the mask generator: its masks are stage 1's, measured with stage 1's model
                    row["masks"] = mask_measures(p1, ds, idx, batch_size=batch_size, n_boot=n_boot, level=level)
                rows.append(row)
                if partial is not None:
                    write_json(partial, {"key": resume_key, "rows": rows})
    finally:
        bar.close()
    compared = COMPARED + ((TRAINED_BASELINE,) if pb is not None else ())
    rows = paired_differences(with_intervals(rows, n_boot, level), n_boot=n_boot, level=level, compared=compared)
    if pb is not None:
        rows = paired_differences(rows, against=TRAINED_BASELINE, n_boot=n_boot, level=level)
    if path is not None:
        record = {"settings": {**run_settings, "n_boot": int(n_boot), "level": float(level),
                               "intervals": "bootstrap over windows (one image per window), persviz.stats"},
                  "rows": rows}
        write_json(path, record)
        if partial is not None and partial.is_file():
            partial.unlink()
    return rows


#: How a row reads the history (``generate_and_score``): the model's own ``HISTORY_MODES`` ("mask", "keep",
#: "none", and "truth" = the ground truth's keep-mask ``measures.truth_keep_mask``: every distractor token dropped)
#: and "truth_budget" (``measures.perfect_keep_mask`` at the model's history ratio: as many tokens per image as
#: Pigeon's mask keeps, distractor tokens dropped first).
READ_MODES = HISTORY_MODES + ("truth_budget",)


def history_keep_of(mode: str, distractor_tokens: torch.Tensor, history_ratio: float) -> torch.Tensor | None:
    """The ground-truth keep-mask [B, H, n] a read mode passes to the model (None for the model's own modes)."""
    if mode == "truth":
        return truth_keep_mask(distractor_tokens)
    if mode == "truth_budget":
        return perfect_keep_mask(distractor_tokens, history_ratio)
    return None


def generate_and_score(pipe: PigeonPipeline, mode: str, ds: PigeonDataset, idx: Sequence[int], clip: Any, dino: Any,
                       oracle: Any, seed: int = 0, batch_size: int = 8, num_inference_steps: int = 25,
                       guidance_scale: float = 4.0, ratios: Sequence[float] = RATIOS,
                       histories: np.ndarray | None = None, windows: Sequence[Any] | None = None,
                       bar: Any = None) -> tuple[dict[str, Any], list[int]]:
    """One row of a comparison: test-time ratio selection on windows ``idx`` with the history read as ``mode``
    (``READ_MODES``), latents of the batch starting at j drawn from ``seed + j``; scored by ``score_generations``
    with per-window items (their "window" list first). Returns (scores, how often each ratio was selected)."""
    if mode not in READ_MODES:
        raise ValueError(f"mode={mode!r}; use one of {READ_MODES}")
    idx = [int(i) for i in idx]
    if windows is None:
        windows = [ds.window(i) for i in idx]
    if histories is None:
        histories = np.stack([ds.images(i)["history"] for i in idx])
    images, counts = [], [0] * len(ratios)
    with history_mode(pipe, "truth" if mode == "truth_budget" else mode):
        for j in range(0, len(idx), batch_size):
            b = default_collate([ds[i] for i in idx[j:j + batch_size]])
            keep = history_keep_of(mode, b["history_distractor_tokens"], pipe.model.config.history_ratio)
            extra = {} if keep is None else {"history_keep": keep}
            sel = pipe.select(b["history"], b["reference"], b["instruction"], ratios=ratios, generator=seed + j,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **extra)
            images.append(as_uint8(sel.images))
            for r in sel.ratio_index:
                counts[r] += 1
            if bar is not None:
                bar.update(1)
    scores = score_generations(np.concatenate(images), histories, windows, clip, dino, oracle, per_item=True)
    scores["items"] = {"window": idx, **scores["items"]}
    return scores, counts


def _weights_stamp(weights: Any) -> Any:
    """Size and mtime of a weights folder's file (a resume must not mix two trainings); None for a pipeline."""
    if weights is None or isinstance(weights, PigeonPipeline):
        return None
    f = Path(weights).expanduser() / WEIGHTS_FILE
    return [f.stat().st_size, f.stat().st_mtime_ns] if f.is_file() else None


def _read_partial(partial: Path | None, key: str) -> dict[tuple[float, str], dict[str, Any]]:
    """The finished blocks of an interrupted run with the same key, {(noise rate, row key): row}; else {}."""
    if partial is None or not partial.is_file():
        return {}
    try:
        rec = json.loads(partial.read_text())
    except (OSError, ValueError):
        return {}
    if rec.get("key") != key:
        return {}
    return {(float(r["noise_rate"]), r["key"]): r for r in rec.get("rows", [])}


def _items(row: Mapping[str, Any], metric: str) -> np.ndarray | None:
    items = row.get("items") or {}
    return None if metric not in items else np.asarray(items[metric], dtype=np.float64)


def with_intervals(rows: Sequence[Mapping[str, Any]], n_boot: int = N_BOOT, level: float = LEVEL,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The rows with "intervals" {metric: Interval as JSON} for every metric of ``METRICS`` they have per-window
    scores of: the mean over windows with its percentile bootstrap interval (``persviz.stats.bootstrap_mean``,
    windows resampled; one image per window, so no seed level). Rows without "items" come back unchanged."""
    out = []
    for r in rows:
        r = dict(r)
        iv = {}
        for k, _, _ in METRICS:
            v = _items(r, k)
            if v is not None and v.size:
                iv[k] = bootstrap_mean(v[:, None], n_boot, level, seed).to_json()
        if iv:
            r["intervals"] = iv
        out.append(r)
    return out


def paired_differences(rows: Sequence[Mapping[str, Any]], against: str = BASELINE,
                       compared: Sequence[str] = COMPARED, n_boot: int = N_BOOT, level: float = LEVEL,
                       seed: int = 0) -> list[dict[str, Any]]:
    """The rows with f"vs_{against}" on each ``compared`` row: per metric, row - ``against`` row of the same noise
    rate on the same windows and latents (``persviz.stats.paired_difference``: mean, bootstrap interval over
    windows, Wilcoxon p over windows) and Holm's p across the metrics of that row (``holm_table``)."""
    base = {(float(r["noise_rate"]), r["key"]): r for r in rows}
    out = []
    for r in rows:
        r = dict(r)
        ref = base.get((float(r["noise_rate"]), against))
        if r["key"] in compared and ref is not None and "items" in r and "items" in ref:
            if list(r["items"].get("window", [])) != list(ref["items"].get("window", [])):
                raise ValueError(f"rows {r['key']!r} and {against!r} at noise {r['noise_rate']:g} hold different "
                                 f"windows; they cannot be paired")
            diffs = {}
            for k, _, _ in METRICS:
                a, b = _items(ref, k), _items(r, k)
                if a is not None and b is not None:
                    diffs[k] = paired_difference(a[:, None], b[:, None], n_boot, level, seed)
            r[f"vs_{against}"] = {k: d.to_json() for k, d in holm_table(diffs).items()}
        out.append(r)
    return out


def load_comparison(path: PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, settings) of a JSON file written by ``comparison_table(path=...)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no comparison table at {p}; write one with comparison_table(..., path='{p}')")
    rec = json.loads(p.read_text())
    if not isinstance(rec, Mapping) or "rows" not in rec:
        raise ValueError(f"{p} is not a comparison table (no 'rows'); write it with comparison_table(path=...)")
    return list(rec["rows"]), dict(rec.get("settings", {}))


def format_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """The comparison rows as a markdown table: one line per (noise rate, row), one column per metric; each cell
    the mean with its bootstrap 95 % interval over windows, "mean [low, high]" (files without per-window scores:
    "mean ± SEM" where there is one)."""
    if not rows:
        raise ValueError("no rows to format; run comparison_table first")
    keys = list(metrics) if metrics is not None else [k for k, _, _ in METRICS]
    labels = {k: lab for k, lab, _ in METRICS}
    head = "| noise | row | n | " + " | ".join(labels.get(k, k) for k in keys) + " |"
    lines = [head, "|" + "---|" * (3 + len(keys))]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                cells.append("–")
                continue
            iv = (r.get("intervals") or {}).get(k)
            pm = r.get(f"{k}_sem")
            text = f"{v:.2f}"
            if iv is not None:
                text += f" [{iv['low']:.2f}, {iv['high']:.2f}]"
            elif pm is not None and isinstance(pm, float) and math.isfinite(pm):
                text += f" ± {pm:.2f}"
            cells.append(text)
        lines.append(f"| {r['noise_rate']:g} | {r['row']} | {r.get('n', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_differences(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None,
                       against: str = BASELINE) -> str:
    """The paired differences of ``paired_differences`` as a markdown table: one line per (noise rate, stage),
    each cell "difference [low, high] p (Holm p)" against the row ``against``."""
    field = f"vs_{against}"
    have = [r for r in rows if field in r]
    if not have:
        raise ValueError(f"no row holds {field!r}; compute them with paired_differences(rows) on rows with per-window "
                         f"scores (comparison_table writes them)")
    keys = list(metrics) if metrics is not None else [k for k, _, _ in METRICS if k in have[0][field]]
    labels = {k: lab for k, lab, _ in METRICS}
    lines = [f"| noise | minus {ROW_LABELS.get(against, against)} | n | " + " | ".join(labels.get(k, k) for k in keys) + " |",
             "|" + "---|" * (3 + len(keys))]
    for r in have:
        cells = []
        for k in keys:
            d = r[field].get(k)
            if d is None:
                cells.append("–")
                continue
            p, q = d.get("p"), d.get("p_holm")
            ptext = "" if p is None or not math.isfinite(p) else f" p={p:.2g} (Holm {q:.2g})"
            cells.append(f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{ptext}")
        n = next(iter(r[field].values()))["n_prompts"] if r[field] else ""
        lines.append(f"| {r['noise_rate']:g} | {r['row']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_mask_measures(rows: Sequence[Mapping[str, Any]]) -> str:
    """The "masks" of the stage-1 rows (token-level noise) as a markdown table: per noise rate the measured share
    of distractor tokens, the kept-noise share of Pigeon's mask, of a perfect mask and of chance, and the score
    AUC, each "mean [low, high]" (bootstrap over windows)."""
    have = [r for r in rows if "masks" in r and r.get("key") == "stage1"]
    if not have:
        raise ValueError("no stage-1 row holds 'masks'; they come from comparison_table on token-level noise "
                         "(regime 'token')")
    lines = ["| noise (requested) | distractor tokens | n | " + " | ".join(MASK_MEASURES.values()) + " |",
             "|" + "---|" * (3 + len(MASK_MEASURES))]
    for r in have:
        m = r["masks"]
        cells = []
        for k in MASK_MEASURES:
            iv = m["intervals"].get(k)
            cells.append("–" if iv is None else f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]")
        lines.append(f"| {r['noise_rate']:g} | {m['noise_rate']:.3f} | {m['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what the mask generator keeps


@torch.no_grad()
def token_scores(pipe: PigeonPipeline, history: Any, reference: Any) -> torch.Tensor:
    """The mask generator's token scores at inference, [B, H + 1, n] (history images, then the reference).

    Honours ``history_mode`` ("none" scores zeroed history tokens, as ``prepare`` does). Inputs as in
    ``users.validate_request`` (one request or a batch).
    """
    model = pipe.model
    cfg = model.config
    n_req = as_image_tensor(history, "history", 4, cfg.image_size)[0].shape[0]
    hist, ref, _ = validate_request(history, reference, ["scores"] * n_req, None, cfg.n_history, cfg.image_size)
    b = hist.shape[0]
    tokens = model.visual(torch.cat([hist.flatten(0, 1), ref]).to(model.device))
    hist_tok = tokens[:b * cfg.n_history].view(b, cfg.n_history, *tokens.shape[1:])
    if model.history_mode == "none":
        hist_tok = torch.zeros_like(hist_tok)
    all_tok = torch.cat([hist_tok, tokens[b * cfg.n_history:].unsqueeze(1)], 1)
    types = torch.tensor([HISTORY_TYPE] * cfg.n_history + [REFERENCE_TYPE], device=all_tok.device)
    gen = model.mask_generator
    was = gen.training
    gen.eval()
    try:
        return gen(all_tok, types).float().cpu()
    finally:
        gen.train(was)


def history_keep_mask(pipe: PigeonPipeline, scores: torch.Tensor) -> torch.Tensor:
    """The inference history keep-mask [B, H, n] from ``token_scores`` (what ``PigeonModel.prepare`` keeps)."""
    model = pipe.model
    h = model.config.n_history
    if model.history_mode == "none":
        return torch.zeros_like(scores[:, :h])
    ratio = 0.0 if model.history_mode == "keep" else model.config.history_ratio
    return gumbel_topk_mask(scores[:, :h], ratio, keep="high", training=False).detach()


def noise_fraction(keep: torch.Tensor, is_noise: torch.Tensor) -> tuple[float, float]:
    """(fraction of kept tokens that lie in noise images, fraction of all tokens that do: the chance level).

    Args:
        keep: keep-mask [B, H, n] (1 = kept).
        is_noise: bool [B, H], True for a noise image.
    """
    keep, noise = torch.as_tensor(keep).float(), torch.as_tensor(is_noise).bool()
    if keep.ndim != 3 or tuple(noise.shape) != tuple(keep.shape[:2]):
        raise ValueError(f"keep must be [B, H, n] and is_noise [B, H]; got {tuple(keep.shape)} and "
                         f"{tuple(noise.shape)}")
    if float(keep.sum()) == 0:
        raise ValueError("the keep-mask keeps no token; nothing to count")
    tok_noise = noise[..., None].expand_as(keep).float()
    return float((keep * tok_noise).sum() / keep.sum()), float(tok_noise.mean())


def pooled_keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top ``max(1, int(H * n * (1 - ratio)))`` history tokens of each window ranked TOGETHER: [B, H, n].

    Pigeon keeps a fixed number of tokens per image (so every image, noise or not, keeps the same share); pooled
    across the history the same scores show whether noise images' tokens score lower than liked ones.
    """
    b, h, n = scores.shape
    flat = gumbel_topk_mask(scores.reshape(b, h * n).float(), ratio, keep="high", training=False).detach()
    return flat.view(b, h, n)


def score_auc(scores: torch.Tensor, is_noise: torch.Tensor) -> float:
    """Mean over windows with both kinds of image of P(a liked-image token scores above a noise-image token)
    (ties count one half); 0.5 is chance, NaN when no window has both."""
    aucs = []
    for s, f in zip(scores.float(), torch.as_tensor(is_noise).bool()):
        liked, noise = s[~f].flatten(), s[f].flatten()
        if len(liked) and len(noise):
            d = liked[:, None] - noise[None]
            aucs.append(float((d > 0).float().mean() + 0.5 * (d == 0).float().mean()))
    return float(np.mean(aucs)) if aucs else float("nan")


def kept_noise_fraction(pipe: PigeonPipeline, dataset: PigeonDataset, n_windows: int,
                        batch_size: int = 16) -> dict[str, float]:
    """Which history tokens the mask generator keeps at inference, against which history images are noise.

    Returns a dict:
        "kept_noise_fraction": share of kept history tokens that come from noise images (Pigeon's mask keeps
        the same number of tokens in every image, so this equals "chance" by construction);
        "chance": share of all history tokens in noise images (= the noise rate: every image has n tokens);
        "pooled_kept_noise_fraction": the same share when the top (1 - history ratio) of the tokens is taken over
        the whole history (``pooled_keep_mask``): below chance if noise tokens score low;
        "score_auc": P(liked token scores above a noise token) (``score_auc``; NaN without noise);
        "mean_score_noise", "mean_score_liked", "noise_rate", "n".
    """
    idx = pick_windows(dataset, min(int(n_windows), len(dataset)))
    keeps, pooled, scores_all, noise_all = [], [], [], []
    model = pipe.model
    ratio = 0.0 if model.history_mode == "keep" else model.config.history_ratio
    for j in range(0, len(idx), batch_size):
        b = default_collate([dataset[i] for i in idx[j:j + batch_size]])
        full = token_scores(pipe, b["history"], b["reference"])
        s = full[:, :model.config.n_history]
        keeps.append(history_keep_mask(pipe, full))
        pooled.append(pooled_keep_mask(s, ratio))
        scores_all.append(s)
        noise_all.append(b["history_is_noise"])
    keep, pool, s, noise = (torch.cat(x) for x in (keeps, pooled, scores_all, noise_all))
    kept, chance = noise_fraction(keep, noise)
    pooled_kept, _ = noise_fraction(pool, noise)
    tok_noise = noise[..., None].expand_as(s)
    mean = (lambda m: float(s[m].mean()) if bool(m.any()) else float("nan"))
    return {"noise_rate": float(noise.float().mean()), "n": len(idx), "kept_noise_fraction": kept,
            "chance": chance, "pooled_kept_noise_fraction": pooled_kept, "score_auc": score_auc(s, noise),
            "mean_score_noise": mean(tok_noise), "mean_score_liked": mean(~tok_noise)}


def kept_noise_by_rate(pipe: PigeonPipeline, n_windows: int, noise_rates: Sequence[float] = NOISE_SWEEP,
                       split: str = "test", n_users: int = DATA_DEFAULTS["n_users"],
                       data_seed: int = DATA_DEFAULTS["data_seed"], progress: bool = True) -> list[dict[str, float]]:
    """``kept_noise_fraction`` on held-out users at each noise rate (``heldout_dataset``); one dict per rate."""
    out = []
    for rate in tqdm(list(noise_rates), desc="kept noise", disable=not progress):
        ds = heldout_dataset(rate, split, n_users, data_seed)
        out.append({**kept_noise_fraction(pipe, ds, n_windows), "noise_rate": float(rate)})
    return out


def mask_measures(pipe: PigeonPipeline, dataset: PigeonDataset, indices: Sequence[int], batch_size: int = 16,
                  n_boot: int = N_BOOT, level: float = LEVEL) -> dict[str, Any]:
    """Pigeon's inference history mask on windows ``indices`` against the per-token ground truth (distractor
    tokens, ``PigeonDataset`` item "history_distractor_tokens"; see ``persviz.pigeon.measures``).

    Returns:
        "noise_rate" (share of distractor tokens), "n" (windows), "kept_noise_share" (share of the kept tokens that
        are distractors), "perfect" (that of a mask keeping as many tokens per image and dropping the distractors
        first), "chance" (that of a random mask of the same size), "score_auc" (P(taste token scores above a
        distractor token) within each image, averaged per window), "score_auc_pooled" (ranked over all tokens
        of all windows together), "history_ratio", "items" (the windows and every measure per window) and
        "intervals" {measure: mean with its bootstrap interval over windows (``persviz.stats.bootstrap_mean``)}.
    """
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty; pass the windows to measure (e.g. pick_windows(dataset, 50))")
    model = pipe.model
    h = model.config.n_history
    ratio = 0.0 if model.history_mode == "keep" else model.config.history_ratio
    keeps, scores, noise = [], [], []
    for j in range(0, len(idx), batch_size):
        b = default_collate([dataset[i] for i in idx[j:j + batch_size]])
        full = token_scores(pipe, b["history"], b["reference"])
        keeps.append(history_keep_mask(pipe, full))
        scores.append(full[:, :h])
        noise.append(b["history_distractor_tokens"])
    keep, s, m = torch.cat(keeps), torch.cat(scores), torch.cat(noise)
    per = window_measures(keep, s, m, ratio)
    out: dict[str, Any] = {"noise_rate": float(m.float().mean()), "n": len(idx), "history_ratio": float(ratio)}
    intervals = {}
    for k in ("kept_noise_share", "perfect", "chance", "score_auc"):
        v = np.asarray(per[k], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = float(v.mean()) if v.size else float("nan")
        if v.size:
            intervals[k] = bootstrap_mean(v[:, None], n_boot, level).to_json()
    out["score_auc_pooled"] = token_auc(s, m, per="all")
    out["items"] = {"window": idx, **per}
    out["intervals"] = intervals
    return out


# ----------------------------------------------------------------------------- one window, pairs


def window_masks(pipe: PigeonPipeline, dataset: PigeonDataset, index: int,
                 reference_ratio: float = 0.5) -> dict[str, Any]:
    """What the model reads for window ``index``: images, scores and inference keep-masks (numpy).

    Returns:
        "history" uint8 [H, S, S, 3], "reference" uint8 [S, S, 3], "history_is_noise" bool [H],
        "scores" [H + 1, n], "history_mask" [H, n], "reference_mask" [n] (1 = kept), "instruction", "window";
        on token-level noise also "history_distractor_tokens" bool [H, n] (the renderer's ground truth).
    """
    item, im = dataset[index], dataset.images(index)
    with _eval_mode(pipe), torch.no_grad():
        inputs = pipe.model.prepare(item["history"], item["reference"], item["instruction"], reference_ratio,
                                    training=False)
    scores = token_scores(pipe, item["history"], item["reference"])[0]
    extra = {}
    if "history_distractor_tokens" in item:  # token-level noise: the per-token ground truth
        extra["history_distractor_tokens"] = item["history_distractor_tokens"].numpy()
    return {**extra, "history": im["history"], "reference": im["reference"], "target": im["target"],
            "history_is_noise": item["history_is_noise"].numpy(), "scores": scores.numpy(),
            "history_mask": inputs.history_mask[0].detach().cpu().numpy(),
            "reference_mask": inputs.reference_mask[0, 0].detach().cpu().numpy(),
            "instruction": item["instruction"], "reference_ratio": float(reference_ratio),
            "window": dataset.window(index)}


@torch.no_grad()
def reference_masks(pipe: PigeonPipeline, history: Any, reference: Any, instruction: str,
                    ratios: Sequence[float] = RATIOS) -> np.ndarray:
    """The inference reference keep-masks of one request at each ratio, [R, n] (low-score tokens masked first)."""
    hist, ref, texts = validate_request(history, reference, instruction, None, pipe.model.config.n_history,
                                        pipe.image_size)
    if hist.shape[0] != 1:
        raise ValueError("reference_masks takes one request; pass one history, reference and instruction")
    r = len(ratios)
    with _eval_mode(pipe):
        inputs = pipe.model.prepare(hist.expand(r, *hist.shape[1:]), ref.expand(r, *ref.shape[1:]), texts * r,
                                    [float(x) for x in ratios], training=False)
    return inputs.reference_mask[:, 0].detach().cpu().numpy()


def load_pairs(folder: PathLike) -> dict[str, Any]:
    """The stage-2 preference pairs of a run folder (``pairs.pt``, see ``train.build_pairs``), chunks joined.

    Without ``pairs.pt`` (a training artifact, not shipped) ``pairs_sample.pt`` is read: the first chunk of the
    shipped run's pairs, in the same format.
    """
    path = Path(folder).expanduser() / PAIRS_FILE
    if not path.is_file() and (path.parent / PAIRS_SAMPLE_FILE).is_file():
        path = path.parent / PAIRS_SAMPLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PAIRS_FILE} in {path.parent}: stage 2 writes it before it trains "
                                f"(`persviz pigeon train --stage 2`)")
    state = load_state(path, "run `persviz pigeon train --stage 2` again to write it")
    keys = ("window", "chosen", "rejected", "chosen_ratio", "rejected_ratio", "scores")
    if not state.get(keys[0]):
        raise ValueError(f"{path} holds no pairs yet (stage 2 is still generating them?)")
    return {**{k: torch.cat(state[k]) for k in keys}, "done": int(state["done"])}


def pair_examples(pipe: PigeonPipeline, folder: PathLike, n: int = 4,
                  ratios: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The first ``n`` non-tied stage-2 pairs: history, chosen and rejected images with their ratios and scores.

    The windows index the "train" split of the run's users (read from the folder's config.json).
    """
    pairs = load_pairs(folder)
    rec_path = Path(folder) / "config.json"
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    ratios = tuple(ratios if ratios is not None else rec.get("ratios", RATIOS))
    ds = make_datasets(int(rec.get("n_users", DATA_DEFAULTS["n_users"])), int(rec.get("data_seed", 0)),
                       tuple(rec.get("noise_rates", (0.0, 0.2, 0.4, 0.6))),
                       int(rec.get("n_interactions", DATA_DEFAULTS["n_interactions"])),
                       regime=rec.get("regime", "image"))["train"]
    valid = torch.nonzero(pairs["chosen_ratio"] != pairs["rejected_ratio"]).flatten()[:n]
    if len(valid) == 0:
        raise ValueError("every stored pair is a tie (chosen = rejected ratio); nothing to show")
    chosen = as_uint8(pipe.decode(pairs["chosen"][valid]))
    rejected = as_uint8(pipe.decode(pairs["rejected"][valid]))
    out = []
    for k, p in enumerate(valid.tolist()):
        w = int(pairs["window"][p])
        ci, ri = int(pairs["chosen_ratio"][p]), int(pairs["rejected_ratio"][p])
        out.append({"window": ds.window(w), "history": ds.images(w)["history"],
                    "history_is_noise": np.array(ds.window(w).history_is_noise), "chosen": chosen[k],
                    "rejected": rejected[k], "chosen_ratio": float(ratios[ci]), "rejected_ratio": float(ratios[ri]),
                    "chosen_score": float(pairs["scores"][p, ci]), "rejected_score": float(pairs["scores"][p, ri])})
    return out


# ----------------------------------------------------------------------------- command line


__all__ = ["BASELINE", "COMPARED", "DATA_DEFAULTS", "MASK_MEASURES", "METRICS", "NOISE_SWEEP", "PIGEON_DIR", "ROWS",
           "ROW_LABELS", "TRAINED_BASELINE", "FullScaleNotSupportedError", "comparison_table", "default_evaluators",
           "format_differences",
           "format_mask_measures", "format_table", "heldout_dataset", "mask_measures", "training_regime",
           "READ_MODES", "generate_and_score", "history_keep_of", "history_keep_mask", "history_mode",
           "kept_noise_by_rate", "kept_noise_fraction", "load_comparison",
           "load_pairs", "load_stage", "noise_fraction", "paired_differences", "pair_examples", "pick_windows",
           "pooled_keep_mask", "reference_masks", "require_shapesworld", "score_auc", "score_generations",
           "token_scores", "training_data_settings", "window_masks", "with_intervals"]

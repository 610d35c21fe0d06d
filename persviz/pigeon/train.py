"""Train Pigeon on ShapesWorld users: stage 1 then stage 2 (Xu et al. 2024, Sec. 2.2.4), resumable.

    persviz pigeon train --stage 1                 # -> data/pigeon/stage1/
    persviz pigeon train --stage 2                 # from data/pigeon/stage1 -> data/pigeon/stage2/
    persviz pigeon train --stage 1 --tiny --steps 4 --out /tmp/pigeon-smoke   # random tiny parts
    persviz pigeon train --stage 1 --regime token          # token-level noise -> data/pigeon/token/stage1/
    persviz pigeon train --stage 2 --regime token          # from data/pigeon/token/stage1 -> .../stage2/
    persviz pigeon train --stage baseline --regime token   # the trained baseline -> data/pigeon/token/baseline/

Regimes (``TrainConfig.regime``, ``--regime``): "image" (the default and the shipped runs) trains on users with
whole noise images; "token" on users whose every history image shows the liked object beside distractor
objects, ``noise_rates`` being the share of distractor tokens (``users`` module docstring).

The perfect-mask control (``TrainConfig(perfect_mask=True)``, ``--stage perfect``, regimes with distractor tokens):
stage 1's losses, data and steps, but the history is read through the ground truth's keep-mask (every distractor
token zeroed, every taste token kept; ``PigeonModel.history_mode = "truth"``), at training and at inference.

The trained baseline (``TrainConfig(history_mask=False)``, ``--stage baseline``): stage 1's losses, data and
steps, but the personalization module reads every history token as it is (``PigeonModel.history_mode =
"keep"``: no history mask, no gradient through one). The reference is masked as in stage 1 (its ratio drawn
from U[0, 1], high-score tokens masked) so that the same test-time ratio selection applies to every row of
the comparison; the mask generator thus trains only through the reference mask.

Stage 1, masked preference reconstruction: for a window (5 history images, a reference and an
instruction, the target) the model's conditioning must let the frozen UNet denoise the TARGET's
latents: diffusion MSE (noise or velocity target) at a uniform timestep, min-SNR-5 weighted by
default (``snr_gamma``; the reason is in TrainConfig). History tokens are masked
at ratio ``history_ratio`` (0.2, high-score tokens kept), the reference at a ratio drawn from U[0, 1]
per sample (high-score tokens masked). The MaskGenerator and the PersonalizationModule train.

Stage 2, pairwise preference alignment: the stage-1 model first generates, for ``n_pairs`` training
windows, one candidate per reference ratio in {0, 0.25, 0.5, 0.75, 1} from the same initial latents;
each is scored by the mean CLIP image similarity to the window's history x 100 (``history_score``);
chosen = best, rejected = worst (windows where all candidates tie are not used). These pairs are
written to ``pairs.pt`` in chunks (resumable). Then Diffusion-DPO (``diffusion_dpo_loss``) trains the
PersonalizationModule with the frozen stage-1 copy as the reference policy; the MaskGenerator is
frozen, as in the public code's DPO stage, so policy and reference read the same masks (reference
ratio drawn from U[0, 1], training masking). ``beta`` defaults to 0.1 (Pigeon's value) but see the
note in ``losses.diffusion_dpo_loss``: at diffusion-MSE scale that is the linear regime; the diffusers
example uses 2500.

At inference (``PigeonPipeline.select``) the ratio maximising 0.5 CLIP-T + 0.5 history score is kept.

Files in the output folder: ``config.json`` (the run's settings; a resume must match them, only
``steps`` may differ), ``resume_state.pt`` (weights, optimizer, losses, step; atomic),
``snapshots/pigeon-steps-{k}.safetensors`` every ``save_every`` steps (the last ``keep_snapshots``
kept), and at the end ``pigeon.safetensors`` + ``pigeon_config.json`` (read by
``PigeonPipeline.from_shapesworld(weights=folder)``); stage 2 adds ``pairs.pt``.

Reproducibility: the command line initialises the trainable modules from ``--seed``; step ``s``
draws its windows, masks, ratios, noise and timesteps from ``step_rng(seed, s)`` and runs its dropout
under a global seed derived from (seed, s) inside ``torch.random.fork_rng`` (the caller's random
state is left untouched), so a resumed run equals an uninterrupted one bit for bit on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from persviz.paths import DATA_DIR
from persviz.io import PathLike, atomic_save, atomic_write, load_state, write_json
from persviz.seeding import step_rng
from persviz.trainers.core import TrainResult, check_out_dir, ddpm, run_steps
from persviz.pigeon.losses import diffusion_dpo_loss
from persviz.pigeon.measures import truth_keep_mask
from persviz.pigeon.model import RATIOS, PigeonPipeline, load_weights, read_config, save_weights
from persviz.constants import TOKEN_REGIMES
from persviz.pigeon.users import (DEFAULT_NOISE_RATES, DEFAULT_TOKEN_NOISE_RATES, REGIMES, PigeonDataset,
                                  make_datasets, taste_report)

OUT_DIR = DATA_DIR / "pigeon"
TRAIN_CONFIG_FILE = "config.json"
RESUME_FILE = "resume_state.pt"
PAIRS_FILE = "pairs.pt"
SNAPSHOT_DIR = "snapshots"
_SNAPSHOT = re.compile(r"pigeon-steps-(\d+)\.safetensors")
_FORMAT = 1
DEFAULT_LR = {1: 3e-4, 2: 1e-5}
#: Fields added after the shipped runs, left out of a run's config.json at their defaults (so those runs resume).
_NEW_FIELDS = {"regime": "image", "history_mask": True, "perfect_mask": False}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one stage.

    Args:
        stage: 1 (masked preference reconstruction) or 2 (pairwise preference alignment, DPO).
        steps: optimizer steps (a later call with more steps extends a finished run).
        batch_size: windows (stage 1) or preference pairs (stage 2) per step.
        lr: AdamW learning rate; None: 3e-4 for stage 1, 1e-5 for stage 2.
        weight_decay, warmup, grad_clip: AdamW weight decay, linear warm-up steps, gradient-norm clip.
        snr_gamma: stage 1: min-SNR loss weighting (Hang et al. 2023), ``min(SNR, gamma) / SNR`` per sample
            (``/ (SNR + 1)`` for v-prediction); None: plain MSE. Default 5, as the ShapesWorld UNet was
            trained. It matters here: at t < 250 the MSE is ~10x larger than at higher t but the
            conditioning changes it by <1%, so unweighted batches are dominated by samples that carry
            almost no signal about the taste.
        aux_weight: stage 1: weight of the auxiliary target-prediction loss (0 turns it off). Pigeon's stage 1
            trains the LMM to predict the TARGET's visual tokens; with a frozen diffusion decoder that signal
            reaches our module only through the denoising loss, where the small object's color and texture
            move the MSE by well under 1 %. So a linear head (training only, not shipped) reads the mean of
            the K personalized tokens and must match the target's CLIP image embedding (1 - cosine): the
            paper's target-token prediction, pooled. ``aux_head`` lives in the resume state only.
        save_every: steps between snapshots.
        keep_snapshots: snapshot files kept (the newest).
        seed: training seed (batches, masks, noise, timesteps, dropout).
        n_users, data_seed, noise_rates, n_interactions: the ShapesWorld users (``users.make_datasets``);
            training uses the "train" split. ``noise_rates`` None: the regime's defaults (``DEFAULT_NOISE_RATES``
            for "image", ``DEFAULT_TOKEN_NOISE_RATES`` for "token").
        init_from: stage 2: the stage-1 folder (pigeon.safetensors).
        ratios: stage 2: reference mask ratios of the candidates.
        beta: stage 2: DPO beta (diffusers convention; Pigeon 0.1, diffusers example 2500).
        n_pairs: stage 2: preference pairs generated (one per drawn training window).
        pair_batch: stage 2: windows per generation chunk (a chunk is the unit of resume).
        pair_steps, guidance_scale: stage 2: sampler steps and guidance of the candidates.
        regime: the users' noise: "image" (whole noise images; default) or "token" (distractor tokens inside
            liked images; ``noise_rates`` are shares of distractor tokens, at most 0.5).
        history_mask: False trains the baseline (stage 1 only): every history token read, no history mask.
        perfect_mask: True trains the perfect-mask control (stage 1 only, regimes with distractor tokens): the
            history is read through the ground truth's keep-mask (``measures.truth_keep_mask``: every taste token
            kept, every distractor token zeroed; ``PigeonModel`` history mode "truth"), so no gradient reaches the
            mask generator through the history, which trains only through the reference mask as in the baseline.
    """

    stage: int = 1
    steps: int = 2000
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    snr_gamma: float | None = 5.0
    aux_weight: float = 0.1
    save_every: int = 100
    keep_snapshots: int = 3
    seed: int = 0
    n_users: int = 1000
    data_seed: int = 0
    noise_rates: tuple[float, ...] | None = None
    n_interactions: int = 12
    init_from: str | None = None
    ratios: tuple[float, ...] = RATIOS
    beta: float = 0.1
    n_pairs: int = 2000
    pair_batch: int = 16
    pair_steps: int = 20
    guidance_scale: float = 4.0
    regime: str = "image"
    history_mask: bool = True
    perfect_mask: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2; got {self.stage!r}")
        if self.regime not in REGIMES:
            raise ValueError(f"regime={self.regime!r}; use 'image' (whole noise images) or 'token' (distractor "
                             f"tokens inside liked images)")
        if not isinstance(self.history_mask, bool):
            raise ValueError(f"history_mask must be True (Pigeon) or False (the baseline); got {self.history_mask!r}")
        if self.stage == 2 and not self.history_mask:
            raise ValueError("the baseline (history_mask=False) trains with stage 1's losses only; pass stage=1")
        if not isinstance(self.perfect_mask, bool):
            raise ValueError(f"perfect_mask must be True (the ground truth's mask) or False; got {self.perfect_mask!r}")
        if self.perfect_mask and (self.stage != 1 or not self.history_mask):
            raise ValueError("the perfect-mask control (perfect_mask=True) is a stage-1 run whose history is masked "
                             "(by the ground truth): pass stage=1 and history_mask=True")
        if self.perfect_mask and self.regime == "image":
            raise ValueError("the perfect mask drops distractor tokens, which only the token-level regimes have; "
                             "pass regime='token' (or 'decoy')")
        if self.noise_rates is None:
            object.__setattr__(self, "noise_rates",
                               DEFAULT_TOKEN_NOISE_RATES if self.regime in TOKEN_REGIMES else DEFAULT_NOISE_RATES)
        for name in ("steps", "batch_size", "save_every", "keep_snapshots", "n_users", "n_interactions",
                     "n_pairs", "pair_batch", "pair_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.seed < 0 or self.data_seed < 0 or self.warmup < 0:
            raise ValueError("seed, data_seed and warmup must be >= 0")
        object.__setattr__(self, "noise_rates", tuple(float(r) for r in self.noise_rates))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.stage])
        if not (float(self.lr) > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if self.snr_gamma is not None and not float(self.snr_gamma) > 0:
            raise ValueError(f"snr_gamma must be > 0 or None (plain MSE); got {self.snr_gamma}")
        if not (float(self.aux_weight) >= 0 and math.isfinite(self.aux_weight)):
            raise ValueError(f"aux_weight must be >= 0 (0: no auxiliary loss); got {self.aux_weight}")
        if not float(self.beta) > 0:
            raise ValueError(f"beta must be > 0; got {self.beta} (Pigeon 0.1, diffusers' DPO example 2500)")
        if len(self.ratios) < 2 or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must hold at least two mask ratios in [0, 1]; got {self.ratios}")
        if self.stage == 2 and not self.init_from:
            raise ValueError("stage 2 starts from a stage-1 model: pass init_from (e.g. data/pigeon/stage1)")


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _seeded(seed: int, step: int, device: torch.device) -> Iterator[None]:
    """Global torch RNG (dropout) seeded from (seed, step) inside fork_rng: the caller's state is restored."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + step + 7919)
        yield


def _batch(ds: PigeonDataset, idx: Sequence[int]) -> dict[str, Any]:
    return default_collate([ds[int(i)] for i in idx])


def _min_snr_weight(sched: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weights [B]: min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)."""
    ac = sched.alphas_cumprod.to(t.device)[t].double()
    snr = ac / (1.0 - ac)
    w = snr.clamp(max=gamma) / (snr + 1.0 if sched.config.prediction_type == "v_prediction" else snr)
    return w.float()


def _target(sched: Any, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)


@torch.no_grad()
def _latents(pipe: PigeonPipeline, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents (a posterior sample drawn with g) of images in [-1, 1]."""
    vae = pipe.vae
    post = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    eps = torch.randn(post.mean.shape, generator=g).to(post.mean.device)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return ((post.mean.float() + post.std.float() * eps) - shift) * float(vae.config.scaling_factor)


def _snapshots(out: Path) -> list[tuple[int, Path]]:
    d = out / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    found = ((_SNAPSHOT.fullmatch(p.name), p) for p in d.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _write_snapshot(model: Any, out: Path, step: int, keep: int) -> None:
    atomic_write(out / SNAPSHOT_DIR / f"pigeon-steps-{step}.safetensors",
                        lambda p: save_file(model.trainable_state_dict(), p))
    for _, p in _snapshots(out)[:-keep]:
        p.unlink()


def run_record(config: TrainConfig) -> dict[str, Any]:
    """The settings a run's config.json holds (lists for tuples); fields added since the shipped runs are left
    out at their defaults, so those runs' folders still resume."""
    rec = {**asdict(config), "noise_rates": list(config.noise_rates), "ratios": list(config.ratios)}
    for k, v in _NEW_FIELDS.items():
        if rec[k] == v:
            del rec[k]
    return rec


def _check_run(out: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The resume state of the run in out (same settings but steps), None for a fresh folder."""
    return check_out_dir(out, record, lambda name: name == RESUME_FILE, RESUME_FILE,
                         "pass --steps at least that large, or another --out")


# ----------------------------------------------------------------------------- stage 2 pairs


def build_pairs(pipe: PigeonPipeline, ds: PigeonDataset, config: TrainConfig, path: PathLike,
                progress: bool = True) -> dict[str, Any]:
    """Generate and score stage-2 preference pairs with the current (stage-1) model; resumable by chunk.

    Returns:
        {"window" long [N], "chosen" / "rejected" float [N, c, h, w] (scaled latents), "chosen_ratio" /
        "rejected_ratio" long [N] (indices into config.ratios), "scores" float [N, R], "done" int}.
    """
    if pipe.scorer is None:
        raise ValueError("stage 2 scores candidates with CLIP: build the pipeline with a ClipScorer")
    path = Path(path)
    n = config.n_pairs
    windows = np.random.default_rng([config.seed, 2]).choice(len(ds), size=n, replace=n > len(ds))
    keys = ("window", "chosen", "rejected", "chosen_ratio", "rejected_ratio", "scores")
    state: dict[str, Any] = {"done": 0, **{k: [] for k in keys}}
    if path.is_file():
        state = load_state(path, "move it away and the pairs are generated again")
    if state["done"] < n:
        model = pipe.model
        was = model.training
        model.eval()
        bar = tqdm(total=n, initial=state["done"], desc="stage 2 pairs", disable=not progress)
        try:
            for j0 in range(state["done"], n, config.pair_batch):
                idx = windows[j0:j0 + config.pair_batch]
                b = _batch(ds, idx)
                lat = pipe.candidates(b["history"], b["reference"], b["instruction"], config.ratios,
                                      generator=config.seed * 1_000_003 + j0, output_type="latent",
                                      num_inference_steps=config.pair_steps, guidance_scale=config.guidance_scale)
                k, r = lat.shape[:2]
                imgs = pipe.decode(lat.flatten(0, 1)).view(k, r, 3, *b["history"].shape[-2:]) * 2.0 - 1.0
                scores = pipe.scorer.history_scores(imgs, b["history"])          # [k, R]
                w, lo = scores.argmax(1), scores.argmin(1)
                ar = torch.arange(k)
                state["window"].append(torch.as_tensor(idx, dtype=torch.long))
                state["chosen"].append(lat[ar, w].float())
                state["rejected"].append(lat[ar, lo].float())
                state["chosen_ratio"].append(w)
                state["rejected_ratio"].append(lo)
                state["scores"].append(scores.float())
                state["done"] = j0 + k
                atomic_save(state, path)
                bar.update(k)
        finally:
            bar.close()
            model.train(was)
    return {**{k: torch.cat(state[k]) for k in keys}, "done": state["done"]}


# ----------------------------------------------------------------------------- training


def train(pipe: PigeonPipeline, config: TrainConfig, out_dir: PathLike, progress: bool = True,
          callback: Callable[[int, float], None] | None = None, backbone: str = "shapesworld") -> TrainResult:
    """Run (or resume) one stage in ``out_dir``; see the module docstring.

    Args:
        pipe: the PigeonPipeline (stage 2: its model must have the stage-1 config; the weights are loaded
            from ``config.init_from``). Its model is trained in place.
        config: TrainConfig.
        out_dir: folder of the run (created).
        progress: tqdm progress bars.
        callback: called after each step as ``callback(step, loss)``; an exception raised there stops the
            run, and the next call resumes from the last snapshot.
        backbone: a name of the frozen parts, recorded and checked on resume.
    """
    model = pipe.model
    flags = [(p, p.requires_grad) for m in model.trainable_modules().values() for p in m.parameters()]
    was, mode = model.training, model.history_mode
    try:
        return _train(pipe, config, out_dir, progress, callback, backbone)
    finally:  # requires_grad flags, train/eval and history mode as they were (stage 2 freezes the MaskGenerator)
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was)
        model.history_mode = mode


def _train(pipe: PigeonPipeline, config: TrainConfig, out_dir: PathLike, progress: bool,
           callback: Callable[[int, float], None] | None, backbone: str) -> TrainResult:
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig; got {type(config).__name__}")
    model, unet = pipe.model, pipe.unet
    device = model.device
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": _FORMAT, **run_record(config), "model": model.config.to_dict(), "backbone": backbone}
    state = _check_run(out, record)
    write_json(out / TRAIN_CONFIG_FILE, record)

    ds = make_datasets(config.n_users, config.data_seed, config.noise_rates, config.n_interactions,
                       regime=config.regime)["train"]
    # train() restores the mode
    model.history_mode = "truth" if config.perfect_mask else "mask" if config.history_mask else "keep"
    sched = ddpm(pipe.sd)  # the pipeline's scheduler config as a DDPMScheduler (the training noise schedule)
    n_t = int(sched.config.num_train_timesteps)
    ref_module = None
    pairs: dict[str, Any] | None = None
    if config.stage == 2:
        load_weights(model, config.init_from)
        pairs = build_pairs(pipe, ds, config, out / PAIRS_FILE, progress)
        valid = torch.nonzero(pairs["chosen_ratio"] != pairs["rejected_ratio"]).flatten().numpy()
        if len(valid) == 0:
            raise ValueError("every stage-2 candidate set tied (all history scores equal); nothing to align")
        # the frozen reference: never in the optimizer and only run under no_grad. Its parameters keep
        # requires_grad=True because PyTorch's attention picks other kernels for parameters that do not
        # require grad (last-bit differences); this way policy and reference agree exactly at step 0.
        ref_module = copy.deepcopy(model.personalization).eval()
        model.mask_generator.requires_grad_(False)
        params = list(model.personalization.parameters())
    else:
        params = [p for m in model.trainable_modules().values() for p in m.parameters()]
    aux_head = None
    if config.stage == 1 and config.aux_weight > 0:
        if pipe.scorer is None:
            raise ValueError("aux_weight > 0 needs the pipeline's ClipScorer (target embeddings); pass aux_weight=0")
        proj = int(pipe.scorer.model.config.projection_dim)
        with torch.random.fork_rng(devices=[]):  # the head's init from the seed; the caller's RNG untouched
            torch.manual_seed(config.seed + 17)
            aux_head = torch.nn.Linear(model.config.cross_attention_dim, proj).to(device)
        params = params + list(aux_head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    stats: dict[str, list[float]] = {}
    start = 0
    if state is not None:
        model.load_trainable_state_dict(state["weights"])
        if aux_head is not None:
            aux_head.load_state_dict(state["aux_head"])
        opt.load_state_dict(state["optimizer"])
        losses = [float(x) for x in state["losses"]]
        stats = {k: [float(x) for x in v] for k, v in state["stats"].items()}
        start = int(state["step"])

    def save_state(step: int) -> None:
        atomic_save({"step": step, "weights": model.trainable_state_dict(), "optimizer": opt.state_dict(),
                     "losses": list(losses), "stats": {k: list(v) for k, v in stats.items()},
                     **({"aux_head": aux_head.state_dict()} if aux_head is not None else {})}, out / RESUME_FILE)

    def stage1_step(s: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng, g = step_rng(config.seed, s)
        b = _batch(ds, rng.integers(len(ds), size=config.batch_size))
        gd = g if device.type == "cpu" else torch.Generator(device).manual_seed(config.seed * 1_000_003 + s)
        keep = truth_keep_mask(b["history_distractor_tokens"]) if config.perfect_mask else None
        inputs = model.prepare(b["history"], b["reference"], b["instruction"], None, training=True, generator=gd,
                               history_keep=keep)
        cond = model.condition(inputs)
        z0 = _latents(pipe, b["target"], g)
        noise = torch.randn(z0.shape, generator=g).to(z0.device)
        t = torch.randint(0, n_t, (z0.shape[0],), generator=g).to(z0.device)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt.to(unet.dtype), t, cond.to(unet.dtype)).sample
        err = (pred.float() - _target(sched, z0, noise, t).float()).pow(2).mean(dim=(1, 2, 3))
        if config.snr_gamma is not None:
            err = _min_snr_weight(sched, t, config.snr_gamma).to(err.device) * err
        loss = err.mean()
        if aux_head is None:
            return loss, {}
        tokens = cond[:, -model.config.n_out_tokens:].float()
        want = pipe.scorer.embed_images(b["target"].to(device)).to(device)
        aux = 1.0 - F.cosine_similarity(aux_head(tokens.mean(1)), want, dim=-1).mean()
        return loss + config.aux_weight * aux, {"diffusion": float(loss.detach()), "aux": float(aux.detach())}

    def stage2_step(s: int) -> tuple[torch.Tensor, dict[str, float]]:
        assert pairs is not None and ref_module is not None
        rng, g = step_rng(config.seed, s)
        pick = torch.from_numpy(valid[rng.integers(len(valid), size=config.batch_size)])
        b = _batch(ds, pairs["window"][pick].tolist())
        gd = g if device.type == "cpu" else torch.Generator(device).manual_seed(config.seed * 1_000_003 + s)
        model.mask_generator.eval()
        inputs = model.prepare(b["history"], b["reference"], b["instruction"], None, training=True, generator=gd)
        cond = model.condition(inputs)
        with torch.no_grad():
            cond_ref = model.condition(inputs, personalization=ref_module)
        zw, zl = pairs["chosen"][pick].to(device), pairs["rejected"][pick].to(device)
        noise = torch.randn(zw.shape, generator=g).to(device)
        t = torch.randint(0, n_t, (zw.shape[0],), generator=g).to(device)
        zt = torch.cat([sched.add_noise(zw, noise, t), sched.add_noise(zl, noise, t)]).to(unet.dtype)
        tt = torch.cat([t, t])
        pw, pl = unet(zt, tt, torch.cat([cond, cond]).to(unet.dtype)).sample.float().chunk(2)
        with torch.no_grad():
            rw, rl = unet(zt, tt, torch.cat([cond_ref, cond_ref]).to(unet.dtype)).sample.float().chunk(2)
        loss, st = diffusion_dpo_loss(pw, pl, rw, rl, _target(sched, zw, noise, t), _target(sched, zl, noise, t),
                                      beta=config.beta)
        return loss, {k: float(v) for k, v in st.items()}

    step_fn = stage1_step if config.stage == 1 else stage2_step
    last: dict[str, float] = {}

    def step(s: int) -> float:
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (s + 1) / max(1, config.warmup))
        with _seeded(config.seed, s, device):
            loss, st = step_fn(s)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage {config.stage} loss is {loss.item()} at step {s}; lower "
                                         f"--lr (now {config.lr}) and resume from the last snapshot")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
        for k, v in st.items():
            stats.setdefault(k, []).append(v)
        last.clear()
        last.update(st)
        return float(loss.detach().cpu())

    def snapshot_and_state(k: int) -> None:  # a snapshot with every resume state (also at the last step)
        _write_snapshot(model, out, k, config.keep_snapshots)
        save_state(k)

    if start < config.steps:
        was = model.training
        model.train()
        if config.stage == 2:
            model.mask_generator.eval()
        try:
            run_steps(start=start, steps=config.steps, save_every=config.save_every, step=step, history=losses,
                      snapshot=None, save_state=snapshot_and_state, after=callback,
                      desc=f"pigeon stage {config.stage}", progress=progress,
                      postfix=lambda: {k: f"{last[k]:.3f}" for k in ("implicit_acc", "aux") if k in last})
        finally:
            model.train(was)
    extra = {"stage": config.stage, "steps": config.steps, "backbone": backbone}
    if config.regime != "image" or not config.history_mask:
        extra.update(regime=config.regime, history_mask=config.history_mask)
    if config.perfect_mask:
        extra.update(perfect_mask=True)
    final = save_weights(model, out, extra=extra)
    return TrainResult(out_dir=out, steps=config.steps, loss_history=losses,
                       snapshot_paths=[p for _, p in _snapshots(out)], final_path=final, stats=stats)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(pipe: PigeonPipeline, ds: PigeonDataset, n: int, oracle: Any, batch_size: int = 16,
             num_inference_steps: int = 25, guidance_scale: float = 4.0, seed: int = 0,
             ratios: Sequence[float] = RATIOS) -> dict[str, Any]:
    """Generate for the first ``n`` windows with test-time ratio selection; the oracle judges the taste.

    Returns:
        {"selected": taste_report of the selected images, "selected_anywhere": the same judging the object
        wherever it stands, "per_ratio": {ratio: taste_report},
        "ratio_counts": how often each ratio was selected}.
    """
    n = min(int(n), len(ds))
    if n < 1:
        raise ValueError("evaluate needs n >= 1 and a non-empty dataset")
    windows, sel_imgs, cands = [], [], []
    counts = [0] * len(ratios)
    for i0 in range(0, n, batch_size):
        idx = list(range(i0, min(n, i0 + batch_size)))
        b = _batch(ds, idx)
        sel = pipe.select(b["history"], b["reference"], b["instruction"], ratios=ratios, generator=seed + i0,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        windows += [ds.window(i) for i in idx]
        sel_imgs.append(sel.images)
        cands.append(sel.candidates)
        for j in sel.ratio_index:
            counts[j] += 1

    def read(x: torch.Tensor) -> list[dict]:
        return oracle.read((x * 2.0 - 1.0).clamp(-1, 1))

    all_c = torch.cat(cands)
    selected = read(torch.cat(sel_imgs))
    return {"selected": taste_report(selected, windows),
            "selected_anywhere": taste_report(selected, windows, anywhere=True),
            "per_ratio": {float(r): taste_report(read(all_c[:, j]), windows) for j, r in enumerate(ratios)},
            "ratio_counts": {float(r): c for r, c in zip(ratios, counts)}}


# ----------------------------------------------------------------------------- command line



"""LoRA fine-tuning of a StableDiffusionPipeline's UNet on captioned images: resumable, bit-reproducible on the CPU.

The plain text-to-image LoRA recipe of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: peft LoRA
adapters (``LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")``) on the UNet's attention projections
(to_q, to_k, to_v, to_out.0) only, the text encoder frozen; each image trained with its own caption; noise-prediction
MSE on the VAE latents noised with the pipeline's scheduler config read as a DDPMScheduler; AdamW (betas 0.9/0.999,
eps 1e-8, weight decay 1e-2, constant lr), gradients clipped to norm 1.0. FineXL's benchmark uses it to make
personalized models of exactly known level (`persviz.finexl.benchmark`): images restyled with probability p, captions
left as they were.

It shares the DreamBooth-LoRA trainer's adapters, files and conventions (`persviz.trainers.dreambooth_lora`): the
batch of step s (images with replacement, latent sample, noise, timesteps) comes from ``step_rng(seed, s)`` only, so a
resumed run equals an uninterrupted one bit for bit on the CPU; the adapters sit in ``pipe.unet`` during training only
and are removed on exit (also after an exception); a pipeline that already holds LoRA layers is refused.

Files in ``out_dir``: ``config.json`` (the config and fingerprints of the data and the pipeline, compared on resume),
``checkpoint-{k}/pytorch_lora_weights.safetensors`` every ``save_every`` steps, ``pytorch_lora_weights.safetensors``
at the end (diffusers format, read by ``pipe.load_lora_weights(path)``) and ``resume_state.pt``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from persviz.families.base import Pipeline
from persviz.families import text_stack
from persviz.io import PathLike, atomic_folder, atomic_write
from persviz.seeding import step_rng
from persviz.trainers.core import (
    CHECKPOINT,
    RESUME_FILE,
    Noising,
    TrainResult,
    adamw,
    check_pipe,
    frozen,
    latent_stats,
    optimizer_step,
    owned_by,
    restore_params,
    run_steps,
    save_resume_state,
    sha256,
    start_run,
    token_ids,
    training_images,
)
from persviz.trainers.config_checks import (
    as_float,
    as_int,
    check_resolution,
)
from persviz.trainers.dreambooth_lora import LORA_FILE, has_lora, lora_adapters, pipeline_sha256, save_lora, list_lora_snapshots

_FORMAT = 1


@dataclass(frozen=True)
class LoRAFinetuneConfig:
    """Settings of a UNet-only LoRA fine-tune (rank 4 on to_q/to_k/to_v/to_out.0: 46,592 parameters on the micro-SD).

    Args:
        rank: LoRA rank (lora_alpha = rank, so the LoRA scale is 1).
        steps: optimizer steps in total (a later call with a larger value extends a finished run).
        lr: AdamW learning rate (1e-3: the micro-SD's LoRA barely moves at 1e-4).
        batch_size: images per step, drawn with replacement.
        save_every: snapshot interval in steps.
        seed: fixes the LoRA initialisation and every step's draws.
        resolution: training image size; None: the pipeline's native size.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (None: none).
    """

    rank: int = 4
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 32
    save_every: int = 250
    seed: int = 0
    resolution: int | None = None
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name, low in (("rank", 1), ("steps", 1), ("batch_size", 1), ("save_every", 1), ("seed", 0)):
            as_int(self, name, low)
        as_float(self, "lr", 0.0, open_low=True)
        as_float(self, "weight_decay", 0.0)
        if self.max_grad_norm is not None:
            as_float(self, "max_grad_norm", 0.0, open_low=True)
        check_resolution(self)


def _captions(captions: Sequence[str], n: int) -> list[str]:
    if isinstance(captions, str):
        raise ValueError("captions must be a list with one caption per image, not a single string")
    out = [str(c) for c in captions]
    if len(out) != n:
        raise ValueError(f"got {len(out)} captions for {n} images; pass one caption per image")
    if any(not c.strip() for c in out):
        raise ValueError("captions must be non-empty strings")
    return out


@torch.no_grad()
def _encode_captions(pipe: Pipeline, captions: list[str], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """(text embeddings [U, L, D] of the distinct captions, index [N] of each caption among them)."""
    uniq = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(uniq)}
    text = text_stack(pipe).primary
    ids = token_ids(text.tokenizer, uniq).to(device)
    emb = torch.cat([text.encoder(ids[i:i + 64])[0] for i in range(0, len(ids), 64)])
    return emb, np.array([where[c] for c in captions])


def train_lora_finetune(pipe: Pipeline, images: Any, captions: Sequence[str], config: LoRAFinetuneConfig,
                        out_dir: PathLike, progress: bool = True, callback: Callable[[int, float], None] | None = None,
                        load_result: bool = True) -> TrainResult:
    """Fine-tune UNet LoRA adapters on (image, caption) pairs; resumes the run already in out_dir, if any.

    Args:
        pipe: a StableDiffusionPipeline without LoRA layers (its base weights are never changed).
        images: uint8 [N, H, W, 3] (or a list of PIL images / uint8 arrays of one size).
        captions: one caption per image.
        config: LoRAFinetuneConfig; resuming requires the same config, data and pipeline (only steps may differ).
        out_dir: folder of the run (created); see the module docstring for its files.
        progress: show a tqdm progress bar.
        callback: called after each step as callback(step, loss).
        load_result: load the final LoRA into pipe (False: leave pipe as it was).
    """
    if not isinstance(config, LoRAFinetuneConfig):
        raise ValueError(f"config must be a LoRAFinetuneConfig; got {type(config).__name__}")
    check_pipe(pipe)
    unet, text_encoder, vae = pipe.unet, text_stack(pipe).primary.encoder, pipe.vae
    for name, m in (("unet", unet), ("text_encoder", text_encoder)):
        if has_lora(m):
            raise ValueError(f"pipe's {name} already holds LoRA layers (from pipe.load_lora_weights or an earlier "
                             f"run's result); call pipe.unload_lora_weights() or pass a fresh pipeline")
    device, res, pixels = training_images(pipe, images, config)
    caps = _captions(captions, len(pixels))
    record = {"format": _FORMAT, **asdict(config), "resolution_used": res, "num_images": len(pixels),
              "images_sha256": sha256(pixels), "captions_sha256": sha256(np.array(caps)),
              "dtype": f"{text_encoder.dtype}/{unet.dtype}", "pipeline_sha256": pipeline_sha256(unet, text_encoder)}
    out, state, history, start = start_run(out_dir, record, owned_by(CHECKPOINT, LORA_FILE), "LoRA weights",
                                           "the LoRA weights of earlier steps: list_lora_snapshots(out_dir)")
    final = out / LORA_FILE
    if start < config.steps or not final.is_file():
        adapter_cfg = SimpleNamespace(rank=config.rank, seed=config.seed, train_text_encoder=False)
        unet_dtype = unet.dtype
        with frozen([text_encoder, unet, vae]), lora_adapters(unet, text_encoder, adapter_cfg) as params:
            plist = list(params.values())
            if state is not None:
                restore_params(params, state["params"],
                               f"{out / RESUME_FILE} holds other adapter weights than this pipeline gets; use a new "
                               f"out_dir")
            opt, scaler = adamw(plist, config, device, unet_dtype == torch.float16, state)

            def save_state(k: int) -> None:
                tensors = {n: p.detach().cpu().clone() for n, p in params.items()}
                save_resume_state(out / RESUME_FILE, k, {"params": tensors}, opt, scaler, history)

            def save(folder: Path) -> None:
                save_lora(folder, unet, text_encoder, False)

            if start < config.steps:
                step = _make_step(pipe, config, pixels, caps, device, opt, scaler, plist, unet_dtype)
                run_steps(start=start, steps=config.steps, save_every=config.save_every, step=step,
                          history=history, snapshot=lambda k: atomic_folder(out / f"checkpoint-{k}", save, replace=True),
                          save_state=save_state, after=callback, desc=f"lora {out.name}", progress=progress)
            atomic_write(final, lambda tmp: save_lora(tmp.parent, unet, text_encoder, False, weight_name=tmp.name))
    if load_result:
        pipe.load_lora_weights(str(final))
    return TrainResult(out_dir=out, steps=config.steps, loss_history=history,
                       snapshot_paths=[p for _, p in list_lora_snapshots(out)], final_path=final)


def _make_step(pipe: Pipeline, config: LoRAFinetuneConfig, pixels: np.ndarray, captions: list[str], device: torch.device,
               opt: torch.optim.Optimizer, scaler: Any, params: list[torch.Tensor],
               unet_dtype: torch.dtype) -> Callable[[int], float]:
    """The training step s (inside the adapters' context): images, latent sample, noise, timesteps from step_rng."""
    noising = Noising(pipe)
    mean, std = latent_stats(pipe.vae, pixels, False, device)
    cond, which = _encode_captions(pipe, captions, device)
    which_t = torch.from_numpy(which).to(device)
    n, B = len(pixels), config.batch_size

    def step(s: int) -> float:
        rng, g = step_rng(config.seed, s)
        i = torch.from_numpy(rng.integers(n, size=B)).to(device)
        zt, t, target = noising(mean[i], std[i], g, device)
        pred = pipe.unet(zt.to(unet_dtype), t, cond[which_t[i]].to(unet_dtype)).sample.float()
        loss = F.mse_loss(pred, target)
        optimizer_step(loss, opt, scaler, params, config.max_grad_norm)
        return float(loss.detach().cpu())

    return step


__all__ = ["LoRAFinetuneConfig", "train_lora_finetune", "list_lora_snapshots", "LORA_FILE"]


def load_lora(pipe: Pipeline, path: PathLike, adapter_name: str = "default_0") -> None:
    """Load a diffusers-format LoRA (a pytorch_lora_weights.safetensors file or its folder) into `pipe`.

    A UNet-only LoRA (this module's fine-tunes, FineXL's variants) goes straight into the UNet: diffusers'
    ``pipe.load_lora_weights`` would also look for text-encoder keys and warn that there are none. Anything else
    goes through ``pipe.load_lora_weights``. ``pipe.unload_lora_weights()`` removes it either way."""
    f = Path(path).expanduser()
    f = f / LORA_FILE if f.is_dir() else f
    if not f.is_file():
        raise FileNotFoundError(f"no LoRA at {f}: pass a {LORA_FILE} file or its folder")
    with safe_open(str(f), framework="pt") as sf:
        prefixes = {k.split(".", 1)[0] for k in sf.keys()}
    if prefixes == {"unet"}:
        pipe.unet.load_lora_adapter(str(f), prefix="unet", adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(f), adapter_name=adapter_name)

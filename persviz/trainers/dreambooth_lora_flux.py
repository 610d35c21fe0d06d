"""DreamBooth-LoRA on the FLUX.1 transformer, as diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` trains
it with its defaults (the Flux family's recipe: persviz.families.flux), run by the DreamBooth method
(persviz.methods.dreambooth) for a pipeline whose denoiser is a transformer.

What a step does (the script's, with its defaults: ``--weighting_scheme none``, ``--guidance_scale 3.5``, text encoders
off): the two prompts are encoded once as ``FluxPipeline.encode_prompt`` encodes them (``Family.prompt_states``: T5's
last hidden state, CLIP's pooled output; text ids zero); an image's VAE latents (a posterior sample, less the VAE's
``shift_factor``, times its ``scaling_factor``) are noised along the flow ``(1 - sigma) x + sigma noise`` at a timestep
drawn uniformly from the scheduler's 1000 training timesteps (its sigma from the scheduler's own table, as the
script's ``get_sigmas``), packed 2x2 into image tokens (``FluxPipeline._pack_latents``, with
``_prepare_latent_image_ids``), and the transformer (timestep / 1000, the guidance 3.5 where it takes one: FLUX.1-dev)
predicts the velocity ``noise - x``; the loss is its mean squared error. LoRA (rank r, alpha r, peft's "gaussian"
initialisation drawn from a stream of its own) on the script's default target modules of every double- and
single-stream block. Randomness per step from ``step_rng(seed, s)`` only, so a resumed run equals an uninterrupted one
bit for bit on the CPU. Files as the SD trainer's: ``config.json``, ``checkpoint-{k}/pytorch_lora_weights.safetensors``,
``pytorch_lora_weights.safetensors`` (``FluxPipeline.save_lora_weights``: ``transformer.*`` keys, read by
``pipe.load_lora_weights``), ``resume_state.pt``.

Not done yet, each refused with a sentence: LoRA on the text encoders (``--train_text_encoder``) and prior
preservation (both off by the script's default).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from persviz.families import family_of, text_stack
from persviz.families.base import Pipeline
from persviz.io import PathLike, atomic_folder, atomic_write
from persviz.seeding import step_rng
from persviz.trainers.dreambooth_lora import (
    ADAPTER,
    LORA_FILE,
    check_identifier_ids,
    has_lora,
    list_lora_snapshots,
    lora_adapters,
)
from persviz.trainers.core import (
    CHECKPOINT,
    RESUME_FILE,
    TrainResult,
    adamw,
    draw_images,
    frozen,
    latent_stats,
    optimizer_step,
    owned_by,
    restore_params,
    run_steps,
    save_resume_state,
    sha256,
    start_run,
    tensors_sha256,
    token_ids,
    training_images,
)

#: train_dreambooth_lora_flux.py's target modules when --lora_layers is not given
FLUX_TARGETS: tuple[str, ...] = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                                 "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                                 "ff_context.net.0.proj", "ff_context.net.2")
TRAIN_GUIDANCE = 3.5  # the script's --guidance_scale default: the guidance input of a guidance-distilled transformer
_FORMAT = 1


def save_transformer_lora(folder: Path, transformer: Any, adapter: str, weight_name: str, pipeline_class: Any) -> None:
    """The transformer's adapters in diffusers' format (``transformer.*`` keys), written by the pipeline class's
    ``save_lora_weights`` as the script saves them (float32 on the CPU)."""
    from diffusers.utils import convert_state_dict_to_diffusers  # heavy: diffusers
    from peft import get_peft_model_state_dict  # heavy: peft
    raw = convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer, adapter_name=adapter))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in raw.items()}
    pipeline_class.save_lora_weights(save_directory=str(folder), transformer_lora_layers=layers,
                                     weight_name=weight_name)


def train_transformer_lora(pipe: Pipeline, images: Any, config: Any, out_dir: PathLike, progress: bool = True,
                           callback: Callable[[int, float], None] | None = None,
                           load_result: bool = True) -> TrainResult:
    """train_dreambooth_lora for a FLUX.1 pipeline (see the module docstring); the same arguments and result."""
    if config.train_text_encoder:
        raise ValueError("persviz trains DreamBooth-LoRA on the FLUX.1 transformer only so far; train it with the text "
                         "encoders off (train_text_encoder=False, the default of diffusers' "
                         "train_dreambooth_lora_flux.py)")
    if config.prior_preservation:
        raise ValueError("persviz trains DreamBooth-LoRA on FLUX.1 without prior preservation so far (the default of "
                         "diffusers' train_dreambooth_lora_flux.py); pass prior_preservation=False")
    family, stack = family_of(pipe), text_stack(pipe)
    transformer, vae = pipe.transformer, pipe.vae
    if has_lora(transformer):
        raise ValueError("pipe's transformer already holds LoRA layers (from pipe.load_lora_weights or an earlier "
                         "run's result); call pipe.unload_lora_weights() or pass a fresh pipeline")
    ident = check_identifier_ids(stack.primary.tokenizer, config)
    device, res, pixels = training_images(pipe, images, config)
    if res % (2 * pipe.vae_scale_factor):
        raise ValueError(f"resolution {res} is not a multiple of {2 * pipe.vae_scale_factor} (FLUX.1 packs 2 x 2 "
                         "latents into one image token); pass a resolution such as 512")
    first_k = next(m.weight for n, m in transformer.named_modules() if n.endswith("attn.to_k"))
    record = {"format": _FORMAT, "denoiser": "transformer", **asdict(config), "resolution_used": res,
              "num_images": len(pixels), "images_sha256": sha256(pixels), "identifier_ids": ident,
              "guidance": TRAIN_GUIDANCE if transformer.config.guidance_embeds else None,
              "dtype": f"{stack.encoders[-1].encoder.dtype}/{transformer.dtype}",
              "pipeline_sha256": tensors_sha256(first_k, stack.primary.rows)}
    out, state, history, start = start_run(out_dir, record, owned_by(CHECKPOINT, LORA_FILE), "LoRA weights",
                                           "the LoRA weights of earlier steps: list_lora_snapshots(out_dir)",
                                           final=LORA_FILE)
    final = out / LORA_FILE
    if start < config.steps or not final.is_file():
        with frozen([e.encoder for e in stack] + [transformer, vae]), \
                lora_adapters(transformer, None, config, FLUX_TARGETS) as params:
            plist = list(params.values())
            if state is not None:
                restore_params(params, state["params"],
                               f"{out / RESUME_FILE} holds other adapter weights than this pipeline gets; use a new "
                               f"out_dir")
            opt, scaler = adamw(plist, config, device, transformer.dtype == torch.float16, state)

            def save_state(k: int) -> None:
                tensors = {n: p.detach().cpu().clone() for n, p in params.items()}
                save_resume_state(out / RESUME_FILE, k, {"params": tensors}, opt, scaler, history)

            def save(folder: Path) -> None:
                save_transformer_lora(folder, transformer, ADAPTER, LORA_FILE, type(pipe))

            if start < config.steps:
                step = flux_step(pipe, family, stack, config, pixels, device, opt, scaler, plist)
                def snapshot(k: int) -> None:
                    atomic_folder(out / f"checkpoint-{k}", save, replace=True)

                run_steps(start=start, steps=config.steps, save_every=config.save_every, step=step,
                          history=history, snapshot=snapshot,
                          save_state=save_state, after=callback, desc=f"dreambooth-lora {config.identifier}",
                          progress=progress)
            atomic_write(final, lambda tmp: save_transformer_lora(tmp.parent, transformer, ADAPTER, tmp.name,
                                                                  type(pipe)))
    if load_result:
        pipe.load_lora_weights(str(final))
    return TrainResult(out_dir=out, steps=config.steps, loss_history=history,
                       snapshot_paths=[p for _, p in list_lora_snapshots(out)], final_path=final)


def flux_condition(family: Any, stack: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [P, L, D_t5], pooled_prompt_embeds [P, D_clip]) of prompts, as FluxPipeline.encode_prompt (and
    the script's encode_prompt) make them: padded to each tokenizer's maximum length."""
    tokens = [{"input_ids": token_ids(e.tokenizer, prompts)} for e in stack]
    hidden, pooled = family.prompt_states(stack, tokens)
    states = family.state_encoders(stack)
    return torch.cat([h for h, e in zip(hidden, stack) if e.name in states], dim=-1), pooled


def flux_step(pipe: Pipeline, family: Any, stack: Any, config: Any, pixels: np.ndarray, device: torch.device,
              opt: torch.optim.Optimizer, scaler: Any, params: list[torch.Tensor]) -> Callable[[int], float]:
    """The training step s (inside the adapters' context): images, the posterior sample, the noise and the
    timesteps drawn from step_rng(seed, s), in that order."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # heavy: diffusers
    transformer, vae = pipe.transformer, pipe.vae
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the script's noise_scheduler
    n_train = int(scheduler.config.num_train_timesteps)
    table_t, table_sigma = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    flip = config.flip_p > 0
    mean, std = latent_stats(vae, pixels, flip, device)
    with torch.no_grad():
        cond, pooled = flux_condition(family, stack, [config.instance_prompt])
    dtype = transformer.dtype
    B = config.batch_size
    h, w = mean.shape[2], mean.shape[3]
    img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(cond.shape[1], 3, device=device, dtype=dtype)
    guidance = (torch.full((B,), TRAIN_GUIDANCE, device=device, dtype=torch.float32)
                if transformer.config.guidance_embeds else None)
    cond, pooled = cond.to(device, dtype).expand(B, -1, -1), pooled.to(device, dtype).expand(B, -1)

    def step(s: int) -> float:
        rng, g = step_rng(config.seed, s)
        i = torch.from_numpy(draw_images(rng, len(pixels), B, config.flip_p)).to(device)
        eps_latent = torch.randn(mean[i].shape, generator=g).to(device)  # the posterior sample
        noise = torch.randn(mean[i].shape, generator=g).to(device)
        u = torch.rand(B, generator=g)  # weighting_scheme "none": uniform
        idx = (u * n_train).long()
        t, sigma = table_t[idx].to(device), table_sigma[idx].to(device).view(B, 1, 1, 1)
        x = ((mean[i] + std[i] * eps_latent) - shift) * scale
        zt = (1.0 - sigma) * x + sigma * noise
        packed = FluxPipeline._pack_latents(zt.to(dtype), B, zt.shape[1], h, w)
        pred = transformer(hidden_states=packed, timestep=(t / 1000).to(dtype), guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=cond, txt_ids=txt_ids, img_ids=img_ids,
                           return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                            pipe.vae_scale_factor).float()
        loss = F.mse_loss(pred, (noise - x).float())
        optimizer_step(loss, opt, scaler, params, config.max_grad_norm)
        return float(loss.detach().cpu())

    return step


__all__ = ["FLUX_TARGETS", "TRAIN_GUIDANCE", "flux_condition", "flux_step", "save_transformer_lora",
           "train_transformer_lora"]

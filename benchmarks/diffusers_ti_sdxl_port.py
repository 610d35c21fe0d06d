"""Port of the training loop of diffusers' examples/textual_inversion/textual_inversion_sdxl.py (huggingface/diffusers,
read at commit b0a6ac95edcbf1bdede056fc166c74ec3da3f720: the version that trains a row in both text encoders).

Ported: ``main()`` from "Add the placeholder token in tokenizer_1" through the step loop, and
``TextualInversionDataset.__getitem__``. As in the example:
- the placeholder token(s) are added to tokenizer_1 and tokenizer_2 (refused if present), the initializer must be
  one token in both, both text encoders are resized (``resize_token_embeddings(len(tokenizer))``) and the new rows
  initialised with each encoder's own initializer row;
- vae and unet frozen; in both text encoders the encoder layers, final layer norm and position embedding frozen, so
  both whole input-embedding matrices train;
- one AdamW over ``[text_encoder_1 token_embedding.weight, text_encoder_2 token_embedding.weight]`` (betas
  0.9/0.999, weight decay 1e-2, eps 1e-8, its --adam_weight_decay default) with ``get_scheduler("constant")``; both
  ``orig_embeds_params`` cloned before the loop; ``text_encoder_1.train()``, ``text_encoder_2.train()``;
- per step: ``vae.encode(pixel_values).latent_dist.sample() * scaling_factor``, noise, random timesteps,
  ``noise_scheduler.add_noise``, ``text_encoder_1(input_ids_1, output_hidden_states=True).hidden_states[-2]``,
  ``encoder_output_2 = text_encoder_2(input_ids_2, output_hidden_states=True)`` and its ``hidden_states[-2]``,
  ``add_time_ids = original_size + crop_top_left + (resolution, resolution)``, ``added_cond_kwargs =
  {"text_embeds": encoder_output_2[0], "time_ids": add_time_ids}``, the two states concatenated, ``unet(...)``,
  epsilon or v-prediction target, ``F.mse_loss(model_pred.float(), target.float())``, backward, ``optimizer.step()``,
  ``lr_scheduler.step()``, ``optimizer.zero_grad()``, then every row but the placeholder's restored in each encoder
  from its ``orig_embeds_params[index_no_updates]``;
- the image: ``original_size`` = (height, width) before resizing, resized to (resolution, resolution) (PIL bicubic),
  the crop of the resized image at (0, 0) (RandomCrop of an image of exactly the crop's size), flipped or not,
  ``/127.5 - 1``; the prompt: a template formatted with the placeholder string, tokenized by each tokenizer with
  padding to ``model_max_length``.

Changed, as ``diffusers_ti_port.py`` (the SD 1.x example's port) changes it, so that this loop and persviz's trainer
see the same model and the same batches: no Accelerator (one process, float32, no gradient accumulation); no
validation, checkpoints, saving or logging; the models are deep copies of a loaded pipeline's components; the noise
scheduler is ``DDPMScheduler.from_config(pipe.scheduler.config)``; every random draw comes from
``persviz.seeding.step_rng(seed, step)`` in persviz's order (image index, flip, template, then the latent sample, the
noise and the timestep) instead of the shuffled DataLoader, ``random.choice`` and ``RandomHorizontalFlip``;
transformers >= 5 has no ``.text_model`` level (the frozen parts are read from the encoder itself); images are uint8
arrays instead of a folder. Timing hooks as the SD 1.x port: ``on_models(text_encoder=, text_encoder_2=, vae=,
unet=)``, ``phase(name)``, ``callback(step, loss)``.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from persviz.seeding import step_rng


def _example(image: np.ndarray, flip: bool, template: str, placeholder_string: str, tokenizers: Sequence[Any],
              size: int) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int], tuple[int, int]]:
    """TextualInversionDataset.__getitem__ (SDXL) with the draws given: (pixel_values, [input_ids_1, input_ids_2],
    original_size, crop_top_left)."""
    text = template.format(placeholder_string)
    img = Image.fromarray(np.asarray(image).astype(np.uint8))
    original_size = (img.height, img.width)
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    crop_top_left = (0, 0)  # RandomCrop(size).get_params of a size x size image
    ids = [tok(text, padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids[0] for tok in tokenizers]
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = (np.array(img).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1), ids, original_size, crop_top_left


def _freeze_all_but_token_embeddings(encoder: Any) -> None:
    model = getattr(encoder, "text_model", encoder)  # transformers >= 5 dropped the .text_model level
    model.encoder.requires_grad_(False)
    model.final_layer_norm.requires_grad_(False)
    model.embeddings.position_embedding.requires_grad_(False)


def train_like_diffusers_sdxl_example(
    pipe: Any,
    images: np.ndarray,
    placeholder_token: str,
    initializer_token: str,
    templates: Sequence[str],
    max_train_steps: int,
    learning_rate: float = 1e-4,
    train_batch_size: int = 1,
    resolution: int = 512,
    flip_p: float = 0.5,
    seed: int = 0,
    adam_weight_decay: float = 1e-2,
    on_models: Callable[..., None] | None = None,
    phase: Callable[[str], Any] | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Run the example's loop on copies of an SDXL pipeline's models; returns losses, per-step seconds and the learned
    rows {"clip_l": [1, D_l], "clip_g": [1, D_g]}."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    tokenizer_1, tokenizer_2 = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.tokenizer_2)
    text_encoder_1 = copy.deepcopy(pipe.text_encoder).float()
    text_encoder_2 = copy.deepcopy(pipe.text_encoder_2).float()
    vae, unet = copy.deepcopy(pipe.vae), copy.deepcopy(pipe.unet)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    device = text_encoder_1.device

    placeholder_tokens = [placeholder_token]
    for tok in (tokenizer_1, tokenizer_2):
        if tok.add_tokens(placeholder_tokens) != 1:
            raise ValueError(f"The tokenizer already contains the token {placeholder_token}.")
    token_ids = tokenizer_1.encode(initializer_token, add_special_tokens=False)
    token_ids_2 = tokenizer_2.encode(initializer_token, add_special_tokens=False)
    if len(token_ids) > 1 or len(token_ids_2) > 1:
        raise ValueError("The initializer token must be a single token.")
    placeholder_token_ids = tokenizer_1.convert_tokens_to_ids(placeholder_tokens)
    placeholder_token_ids_2 = tokenizer_2.convert_tokens_to_ids(placeholder_tokens)
    text_encoder_1.resize_token_embeddings(len(tokenizer_1))
    text_encoder_2.resize_token_embeddings(len(tokenizer_2))
    token_embeds = text_encoder_1.get_input_embeddings().weight.data
    token_embeds_2 = text_encoder_2.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_token_ids:
            token_embeds[token_id] = token_embeds[token_ids[0]].clone()
        for token_id in placeholder_token_ids_2:
            token_embeds_2[token_id] = token_embeds_2[token_ids_2[0]].clone()

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    _freeze_all_but_token_embeddings(text_encoder_1)
    _freeze_all_but_token_embeddings(text_encoder_2)

    optimizer = torch.optim.AdamW(
        [text_encoder_1.get_input_embeddings().weight, text_encoder_2.get_input_embeddings().weight],
        lr=learning_rate, betas=(0.9, 0.999), weight_decay=adam_weight_decay, eps=1e-08)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=max_train_steps)
    placeholder_string = " ".join(tokenizer_1.convert_ids_to_tokens(placeholder_token_ids))
    orig_embeds_params = text_encoder_1.get_input_embeddings().weight.data.clone()
    orig_embeds_params_2 = text_encoder_2.get_input_embeddings().weight.data.clone()
    n_img = len(images)
    losses, seconds = [], []
    phase = phase or (lambda name: contextlib.nullcontext())
    if on_models is not None:
        on_models(text_encoder=text_encoder_1, text_encoder_2=text_encoder_2, vae=vae, unet=unet)

    text_encoder_1.train()
    text_encoder_2.train()
    for step in range(max_train_steps):
        t0 = time.perf_counter()
        with phase("batch (PIL, tokenizers)"):
            rng, g = step_rng(seed, step)
            idx = rng.integers(n_img, size=train_batch_size)
            flips = rng.random(train_batch_size) < flip_p if flip_p > 0 else np.zeros(train_batch_size, bool)
            tmpl = rng.integers(len(templates), size=train_batch_size)
            examples = [_example(images[i], bool(f), templates[k], placeholder_string, (tokenizer_1, tokenizer_2),
                                 resolution) for i, f, k in zip(idx, flips, tmpl)]
            pixel_values = torch.stack([e[0] for e in examples]).to(device)
            input_ids_1 = torch.stack([e[1][0] for e in examples]).to(device)
            input_ids_2 = torch.stack([e[1][1] for e in examples]).to(device)

        latents = vae.encode(pixel_values.to(dtype=vae.dtype)).latent_dist.sample(generator=g).detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=g).to(device)
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

        encoder_hidden_states_1 = text_encoder_1(input_ids_1, output_hidden_states=True).hidden_states[-2]
        encoder_output_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
        encoder_hidden_states_2 = encoder_output_2.hidden_states[-2]
        add_time_ids = torch.cat([torch.tensor(e[2] + e[3] + (resolution, resolution)) for e in examples]).to(
            device, dtype=unet.dtype)
        added_cond_kwargs = {"text_embeds": encoder_output_2[0], "time_ids": add_time_ids}
        encoder_hidden_states = torch.cat([encoder_hidden_states_1, encoder_hidden_states_2], dim=-1)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

        with phase("restore rows (index_no_updates)"):
            index_no_updates = torch.ones((len(tokenizer_1),), dtype=torch.bool)
            index_no_updates[min(placeholder_token_ids): max(placeholder_token_ids) + 1] = False
            index_no_updates_2 = torch.ones((len(tokenizer_2),), dtype=torch.bool)
            index_no_updates_2[min(placeholder_token_ids_2): max(placeholder_token_ids_2) + 1] = False
            with torch.no_grad():
                text_encoder_1.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]
                text_encoder_2.get_input_embeddings().weight[index_no_updates_2] = orig_embeds_params_2[
                    index_no_updates_2]

        losses.append(loss.detach().item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        if callback is not None:
            callback(step + 1, losses[-1])

    rows = {"clip_l": text_encoder_1.get_input_embeddings().weight.detach()[placeholder_token_ids].float().cpu(),
            "clip_g": text_encoder_2.get_input_embeddings().weight.detach()[placeholder_token_ids_2].float().cpu()}
    return {"losses": losses, "seconds": seconds, "rows": rows}

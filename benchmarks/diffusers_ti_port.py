"""Port of the training loop of diffusers' examples/textual_inversion/textual_inversion.py (huggingface/diffusers).

Ported: ``main()`` from "Add the placeholder token in tokenizer" through the step loop, and
``TextualInversionDataset.__getitem__``. As in the example:
- the placeholder token(s) are added to the tokenizer (refused if present), the initializer must be one token,
  ``text_encoder.resize_token_embeddings(len(tokenizer))`` grows the matrix and the new rows are initialised
  with the initializer's row;
- vae and unet frozen; in the text encoder the encoder layers, final layer norm and position embedding frozen,
  so the whole input-embedding matrix trains;
- AdamW over ``text_encoder.get_input_embeddings().parameters()`` (betas 0.9/0.999, weight decay 1e-2, eps 1e-8)
  with ``get_scheduler("constant")``; ``orig_embeds_params`` is cloned before the loop and ``text_encoder.train()``
  is called before it;
- per step: ``vae.encode(pixel_values).latent_dist.sample() * scaling_factor``, noise, random timesteps,
  ``noise_scheduler.add_noise``, ``text_encoder(input_ids)[0]``, ``unet(...).sample``, epsilon or
  v-prediction target, ``F.mse_loss(model_pred.float(), target.float())``, backward, ``optimizer.step()``,
  ``lr_scheduler.step()``, ``optimizer.zero_grad()``, then every row but the placeholder's is restored from
  ``orig_embeds_params[index_no_updates]``;
- the image: resized to the resolution (PIL bicubic), horizontally flipped or not, ``/127.5 - 1``; the prompt:
  a template formatted with the placeholder string, tokenized with padding to ``model_max_length``.

Changed, so that this loop and persviz's trainer see the same model and the same batches:
- no Accelerator (one process, float32, no gradient accumulation: ``accelerator.backward(loss)`` is
  ``loss.backward()``); no validation, checkpoints, saving, logging or Hub upload;
- the models are deep copies of a loaded pipeline's components (the example loads the same weights with
  ``from_pretrained``); the noise scheduler is ``DDPMScheduler.from_config(pipe.scheduler.config)`` (the
  example's ``from_pretrained(..., subfolder="scheduler")`` reads that config);
- every random draw comes from ``persviz.shapesworld.train.step_rng(seed, step)`` in persviz's order: image
  index, flip, template (numpy), then the latent sample, the noise and the timestep (torch), instead of the
  example's shuffled DataLoader, ``random.choice``, ``RandomHorizontalFlip`` and the global torch RNG. So
  ``latent_dist.sample()`` takes ``generator=g``, ``torch.randn_like(latents)`` becomes
  ``torch.randn(latents.shape, generator=g)`` and ``torch.randint`` takes ``generator=g``.
- transformers >= 5 has no ``text_encoder.text_model`` level: the frozen parts are read from the encoder itself;
- images are given as uint8 arrays instead of read from a folder; center_crop is off, as in the example's default;
- float16 pipelines (GPU timing only): the text encoder copy is cast to float32, as the example keeps the trained
  text encoder in full precision with ``--mixed_precision fp16`` (unet and vae in ``weight_dtype``), and the noise
  takes the latents' dtype (the example's ``torch.randn_like(latents)``); no GradScaler. In float32 both are no-ops;
- timing hooks only: ``on_models(text_encoder=, vae=, unet=)`` sees the copies before the loop, ``phase(name)`` (a
  context manager) brackets the batch preparation and the row restore, ``callback(step, loss)`` runs after each step.
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

from persviz.shapesworld.train import step_rng


def _example(image: np.ndarray, flip: bool, template: str, placeholder_string: str, tokenizer: Any,
             size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TextualInversionDataset.__getitem__ with the draws given: (pixel_values [3, R, R], input_ids [L])."""
    text = template.format(placeholder_string)
    input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids[0]
    img = Image.fromarray(np.asarray(image).astype(np.uint8))
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    if flip:  # transforms.RandomHorizontalFlip with its coin toss drawn outside
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(img).astype(np.uint8)
    arr = (arr / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1), input_ids


def train_like_diffusers_example(
    pipe: Any,
    images: np.ndarray,
    placeholder_token: str,
    initializer_token: str,
    templates: Sequence[str],
    max_train_steps: int,
    learning_rate: float = 5e-4,
    train_batch_size: int = 1,
    resolution: int | None = None,
    flip_p: float = 0.5,
    seed: int = 0,
    num_vectors: int = 1,
    on_models: Callable[..., None] | None = None,
    phase: Callable[[str], Any] | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Run the example's loop on copies of pipe's models; returns losses, per-step seconds and learned rows [n, D]."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    tokenizer = copy.deepcopy(pipe.tokenizer)
    text_encoder = copy.deepcopy(pipe.text_encoder).float()  # float32 already, or as the example's fp16 run
    vae, unet = copy.deepcopy(pipe.vae), copy.deepcopy(pipe.unet)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    device = text_encoder.device
    size = resolution or unet.config.sample_size * int(getattr(pipe, "vae_scale_factor", 8))

    # Add the placeholder token in tokenizer
    placeholder_tokens = [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
    num_added_tokens = tokenizer.add_tokens(placeholder_tokens)
    if num_added_tokens != num_vectors:
        raise ValueError(f"The tokenizer already contains the token {placeholder_token}.")
    token_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(token_ids) > 1:
        raise ValueError("The initializer token must be a single token.")
    initializer_token_id = token_ids[0]
    placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_token_ids:
            token_embeds[token_id] = token_embeds[initializer_token_id].clone()

    # Freeze vae and unet; all of the text encoder but the token embeddings
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers >= 5 dropped the .text_model level
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)

    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=learning_rate,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=max_train_steps)
    placeholder_string = " ".join(tokenizer.convert_ids_to_tokens(placeholder_token_ids))
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    n_img = len(images)
    losses, seconds = [], []
    phase = phase or (lambda name: contextlib.nullcontext())
    if on_models is not None:
        on_models(text_encoder=text_encoder, vae=vae, unet=unet)

    text_encoder.train()
    for step in range(max_train_steps):
        t0 = time.perf_counter()
        # the batch: persviz's draws (see the module docstring), the example's preprocessing
        with phase("batch (PIL, tokenizer)"):
            rng, g = step_rng(seed, step)
            idx = rng.integers(n_img, size=train_batch_size)
            flips = rng.random(train_batch_size) < flip_p if flip_p > 0 else np.zeros(train_batch_size, bool)
            tmpl = rng.integers(len(templates), size=train_batch_size)
            examples = [_example(images[i], bool(f), templates[k], placeholder_string, tokenizer, size)
                        for i, f, k in zip(idx, flips, tmpl)]
            pixel_values = torch.stack([e[0] for e in examples]).to(device)
            input_ids = torch.stack([e[1] for e in examples]).to(device)

        # Convert images to latent space
        latents = vae.encode(pixel_values.to(dtype=vae.dtype)).latent_dist.sample(generator=g).detach()
        latents = latents * vae.config.scaling_factor
        # Sample noise that we'll add to the latents
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=g).to(device)
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=unet.dtype)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
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

        # Let's make sure we don't update any embedding weights besides the newly added token
        with phase("restore rows (index_no_updates)"):
            index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
            index_no_updates[min(placeholder_token_ids): max(placeholder_token_ids) + 1] = False
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]

        losses.append(loss.detach().item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        if callback is not None:
            callback(step + 1, losses[-1])

    rows = text_encoder.get_input_embeddings().weight.detach()[placeholder_token_ids].float().cpu().clone()
    return {"losses": losses, "seconds": seconds, "rows": rows}

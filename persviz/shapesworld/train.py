"""Train every shipped ShapesWorld model, reproducibly and resumably.

    persviz shapesworld train                 # all stages, in order, skipping finished ones
    persviz shapesworld train --stages unet   # one stage (resumes from its snapshot)

Snapshots go to data/cache/ (ignored by git) every few hundred steps; the exported
models go to data/shapesworld/ in diffusers / transformers folders. Each step's batch and
noise come from (seed, step), so an interrupted run resumes to the same result."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import BitImageProcessor, CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from persviz.io import atomic_folder, atomic_save, load_state, write_json
from persviz.seeding import step_rng
from persviz.constants import STAGES, TRAIN_SIZE
from persviz.paths import DATA_DIR, SHAPESWORLD_DIR
from persviz.shapesworld.captions import caption
from persviz.shapesworld.data import cached_dataset, decode_scene
from persviz.shapesworld.models import clip_model, dino_model, sample_scheduler, train_scheduler, unet_model, vae_model
from persviz.shapesworld.oracle import AttributeOracle
from persviz.shapesworld.tokenizer import build_tokenizer_files
from persviz.trainers.core import run_steps

CACHE = DATA_DIR / "cache"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def copy_bpe_files(folder: Path) -> None:
    """Put vocab.json and merges.txt beside a saved tokenizer, so the slow CLIPTokenizer of older transformers loads it."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(SHAPESWORLD_DIR / "tokenizer" / name, folder / name)


def run_loop(name: str, steps: int, state: dict, step_fn: Callable[[int], float], save_every: int = 200) -> None:
    """Run step_fn(step) for steps, snapshotting the modules/optimizers in `state` (resumes if a snapshot exists).

    The loop is the trainers' (persviz.trainers.core.run_steps); the state goes to CACHE/{name}.pt every save_every
    steps and at the last one."""
    snap = CACHE / f"{name}.pt"
    start = 0
    if snap.exists():
        saved = load_state(snap, f"delete it to retrain the {name} stage from its start", map_location=DEVICE)
        for k, obj in state.items():
            obj.load_state_dict(saved[k])
        start = saved["step"]

    def save_state(k: int) -> None:
        atomic_save({"step": k, **{key: o.state_dict() for key, o in state.items()}}, snap)

    run_steps(start=start, steps=steps, save_every=save_every, step=step_fn, history=[], snapshot=None,
              save_state=save_state, after=None, desc=name, progress=True)


def warmup_cosine(opt, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)



def train_set(n: int = TRAIN_SIZE) -> dict:
    return cached_dataset(CACHE / f"train_{n}.npz", n, seed=1)


def tokenizer():
    return CLIPTokenizer.from_pretrained(SHAPESWORLD_DIR / "tokenizer")


def captions_for(codes: np.ndarray, rng: np.random.Generator) -> list[str]:
    return [caption(decode_scene(c), rng) for c in codes]


# ---------------------------------------------------------------- stages
def stage_tokenizer(args) -> None:
    build_tokenizer_files(SHAPESWORLD_DIR / "tokenizer")


def stage_clip(args) -> None:
    data, tok = train_set(args.train_size), tokenizer()
    torch.manual_seed(11)
    model = clip_model(len(tok), tok.bos_token_id, tok.eos_token_id).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    steps = args.clip_steps
    sched = warmup_cosine(opt, 100, steps)

    def step(s: int) -> float:
        rng, _ = step_rng(11, s)
        idx = rng.integers(len(data["images"]), size=256)
        enc = tok(captions_for(data["codes"][idx], rng), padding=True, return_tensors="pt")
        out = model(input_ids=enc.input_ids.to(DEVICE), attention_mask=enc.attention_mask.to(DEVICE),
                     pixel_values=to_tensor(data["images"][idx]).to(DEVICE), return_loss=True)
        out.loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return out.loss.item()

    run_loop("clip", steps, {"model": model, "opt": opt, "sched": sched}, step)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    def save(out: Path) -> None:
        for m in (model, tok, processor):
            m.save_pretrained(out)
        copy_bpe_files(out)
    atomic_folder(SHAPESWORLD_DIR / "clip", save, replace=True)


def stage_vae(args) -> None:
    data = train_set(args.train_size)
    torch.manual_seed(12)
    vae = vae_model().to(DEVICE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    steps = args.vae_steps
    sched = warmup_cosine(opt, 50, steps)

    def step(s: int) -> float:
        rng, g = step_rng(12, s)
        x = to_tensor(data["images"][rng.integers(len(data["images"]), size=64)]).to(DEVICE)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(DEVICE)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return loss.item()

    run_loop("vae", steps, {"model": vae, "opt": opt, "sched": sched}, step)
    with torch.no_grad():
        z = vae.encode(to_tensor(data["images"][:2000]).to(DEVICE)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    atomic_folder(SHAPESWORLD_DIR / "sd" / "vae", vae.save_pretrained, replace=True)


def stage_vae_decoder(args) -> None:
    """Fine-tune the VAE decoder with the encoder frozen (as SD's ft-MSE VAE): sharper textures, same latents."""
    data = train_set(args.train_size)
    vae = AutoencoderKL.from_pretrained(SHAPESWORLD_DIR / "sd" / "vae").to(DEVICE)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=5e-4)
    steps = args.vae_decoder_steps
    sched = warmup_cosine(opt, 50, steps)

    def step(s: int) -> float:
        rng, g = step_rng(16, s)
        x = to_tensor(data["images"][rng.integers(len(data["images"]), size=32)]).to(DEVICE)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + 0.5 * post.std * torch.randn(post.mean.shape, generator=g).to(DEVICE)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return loss.item()

    run_loop("vae_decoder", steps, {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv, "opt": opt,
                                    "sched": sched}, step)

    def save(out: Path) -> None:
        vae.save_pretrained(out)
        (out / "decoder_finetune.json").write_text(json.dumps({"steps": steps, "batch": 32, "encoder": "frozen"}))
    atomic_folder(SHAPESWORLD_DIR / "sd" / "vae", save, replace=True)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and slight brightness changes: the oracle must read generated images too."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.2
    k = torch.arange(-2, 3).float()
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # [B,5]
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    w = kern.repeat_interleave(3, 0)
    xb = F.conv2d(xp.reshape(1, b * 3, *xp.shape[2:]), w[:, None, None, :], groups=b * 3)
    xb = F.conv2d(xb, w[:, None, :, None], groups=b * 3).reshape(b, 3, *x.shape[2:])
    xb = xb * (1 + 0.08 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5))
    return (xb + torch.randn(xb.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.12).clamp(-1, 1)


def stage_oracle(args) -> None:
    data = cached_dataset(CACHE / f"oracle_{args.oracle_size}.npz", args.oracle_size, seed=2)
    torch.manual_seed(13)
    oracle = AttributeOracle().to(DEVICE)
    opt = torch.optim.AdamW(oracle.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.oracle_steps
    sched = warmup_cosine(opt, 50, steps)

    def step(s: int) -> float:
        rng, g = step_rng(13, s)
        idx = rng.integers(len(data["images"]), size=128)
        x = augment(to_tensor(data["images"][idx]), g).to(DEVICE)
        y = torch.from_numpy(data["labels"][idx]).to(DEVICE)
        out = oracle(x)
        loss = F.cross_entropy(out["background"], y[:, 0])
        for j, key in enumerate(("shape", "color", "texture", "size")):
            loss = loss + F.cross_entropy(out[key].flatten(0, 1), y[:, 1 + j::4].flatten(), ignore_index=-1)
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return loss.item()

    run_loop("oracle", steps, {"model": oracle, "opt": opt, "sched": sched}, step)
    atomic_folder(SHAPESWORLD_DIR / "oracle", oracle.save_pretrained, replace=True)


def shift(x: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translation by up to max_px pixels (edge padding)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (max_px,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_px + 1, (2, b), generator=g)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def stage_dino(args) -> None:
    """Self-supervised (SimCLR / InfoNCE on two augmented views) training of a DINOv2-architecture ViT."""
    data = train_set(args.train_size)
    torch.manual_seed(14)
    model = dino_model().to(DEVICE)
    head = torch.nn.Sequential(torch.nn.Linear(96, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(DEVICE)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.05)
    steps = args.dino_steps
    sched = warmup_cosine(opt, 50, steps)

    def step(s: int) -> float:
        rng, g = step_rng(14, s)
        x = to_tensor(data["images"][rng.integers(len(data["images"]), size=128)])
        views = [augment(shift(x, g), g).to(DEVICE) for _ in range(2)]
        z = [F.normalize(head(model(pixel_values=v).last_hidden_state.mean(1)), dim=-1) for v in views]  # mean pooling, as DINO-I reads it
        logits = z[0] @ z[1].T / 0.1
        labels = torch.arange(len(logits), device=DEVICE)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return loss.item()

    run_loop("dino", steps, {"model": model, "head": head, "opt": opt, "sched": sched}, step)
    processor = BitImageProcessor(do_resize=False, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    atomic_folder(SHAPESWORLD_DIR / "dino", lambda out: [m.save_pretrained(out) for m in (model, processor)], replace=True)


def encoded_latents(vae, images: np.ndarray) -> torch.Tensor:
    """Scaled latent means of a uint8 image set, cached beside the training data."""
    path = CACHE / f"latents_{len(images)}.pt"
    if path.exists():
        return load_state(path, "delete it and the latents are encoded again")
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 1000), desc="encode latents"):
            out.append(vae.encode(to_tensor(images[i:i + 1000]).to(DEVICE)).latent_dist.mean.cpu())
    lat = torch.cat(out) * vae.config.scaling_factor
    atomic_save(lat, path)
    return lat


def stage_unet(args) -> None:
    data, tok = train_set(args.train_size), tokenizer()
    vae = AutoencoderKL.from_pretrained(SHAPESWORLD_DIR / "sd" / "vae").to(DEVICE)
    latents = encoded_latents(vae, data["images"])
    text_encoder = CLIPTextModel.from_pretrained(SHAPESWORLD_DIR / "clip").to(DEVICE).eval()
    torch.manual_seed(15)
    unet = unet_model().to(DEVICE)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=4e-4, weight_decay=0.01)
    steps, batch, boost_from = args.unet_steps, 64, args.second_boost_start

    def lr_factor(s: int) -> float:  # warm-up, constant, then a linear decay to 0.1 over the boosted phase
        if s < boost_from:
            return min(1.0, (s + 1) / 200)
        return 1.0 - 0.9 * min(1.0, (s - boost_from) / max(1, steps - boost_from))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    noise_sched = train_scheduler()
    alphas = noise_sched.alphas_cumprod
    two = np.flatnonzero(data["codes"][:, 6] >= 0)  # scenes with a second object

    def step(s: int) -> float:
        rng, g = step_rng(15, s)
        idx = rng.integers(len(latents), size=batch)
        if s >= boost_from:  # binding phase: half of every batch shows two objects
            half = batch // 2
            idx[:half] = two[rng.integers(len(two), size=half)]
        caps = [c if rng.random() >= 0.1 else "" for c in captions_for(data["codes"][idx], rng)]
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            cond = text_encoder(ids.to(DEVICE))[0]
        z0 = latents[idx].to(DEVICE)
        noise = torch.randn(z0.shape, generator=g)
        if s >= args.offset_noise_start:  # offset noise: the image mean must come from the text, not from x_T
            noise = noise + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, generator=g)
        noise = noise.to(DEVICE)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t.to(DEVICE))
        pred = unet(zt, t.to(DEVICE), cond).sample
        snr = alphas[t] / (1 - alphas[t])
        w = (torch.clamp(snr, max=5.0) / snr).to(DEVICE)  # min-SNR-5 weighting
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step(); opt.zero_grad(); sched.step()
        with torch.no_grad():
            d = min(0.999, (1 + s) / (10 + s))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        return loss.item()

    run_loop("unet", steps, {"model": unet, "ema": ema, "opt": opt, "sched": sched}, step, save_every=100)
    atomic_folder(SHAPESWORLD_DIR / "sd" / "unet", ema.save_pretrained, replace=True)


def stage_pipeline(args) -> None:
    """Assemble the StableDiffusionPipeline folder from the trained parts."""
    sd = SHAPESWORLD_DIR / "sd"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd / "vae"), text_encoder=CLIPTextModel.from_pretrained(SHAPESWORLD_DIR / "clip"),
        tokenizer=tokenizer(), unet=UNet2DConditionModel.from_pretrained(sd / "unet"), scheduler=sample_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    def save(out: Path) -> None:
        pipe.save_pretrained(out)
        copy_bpe_files(out / "tokenizer")
        record = sd / "vae" / "decoder_finetune.json"  # keep the provenance of the fine-tuned decoder
        if record.exists():
            shutil.copy(record, out / "vae" / record.name)
    atomic_folder(sd, save, replace=True)


STAGE_FN = {name: globals()[f"stage_{name}"] for name in STAGES}
DONE = {"tokenizer": "tokenizer/vocab.json", "clip": "clip/model.safetensors", "vae": "sd/vae/config.json",
        "vae_decoder": "sd/vae/decoder_finetune.json",
        "oracle": "oracle/config.json", "dino": "dino/config.json", "unet": "sd/unet/config.json",
        "pipeline": "sd/model_index.json"}


def run_stages(args) -> None:
    """Run the asked stages (``args.stages``, comma-separated) whose outputs are missing, or all with ``args.force``;
    ``args`` carries every stage's settings (``persviz shapesworld train --help`` lists them)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    for name in STAGES:
        if name in stages and (args.force or not (SHAPESWORLD_DIR / DONE[name]).exists()):
            STAGE_FN[name](args)
    write_json(CACHE / "last_run.json", {k: v for k, v in vars(args).items() if not callable(v)}, indent=None)

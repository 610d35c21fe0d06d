"""GPU smoke test of the full-scale path: SD 1.5's or SDXL's real architecture with random weights (nothing to
download).

    python benchmarks/gpu_smoke.py                   # one GPU, SD 1.5, 512x512, float16; at most about 8 minutes
    python benchmarks/gpu_smoke.py --family sdxl     # one GPU, SDXL base, 1024x1024, float16
    python benchmarks/gpu_smoke.py --small           # CPU, reduced widths, 64 px: seconds (checks the script itself)
    python benchmarks/gpu_smoke.py --small --family sdxl

SDXL (``--family sdxl``): the architecture of stabilityai/stable-diffusion-xl-base-1.0 (persviz.families.sdxl's
configs: UNet 2.6 B parameters, clip_l + clip_g) built in memory with random weights; the methods persviz trains on
SDXL with the family's recipes (diffusers' SDXL scripts') at 1024 px: Textual Inversion (a row per encoder),
DreamBooth-LoRA with the text encoders off (the recipe) and on (``train_text_encoder``); Custom Diffusion is refused
on SDXL and its sentence is recorded instead of a time. The tracker reads the Textual Inversion run's snapshots (one
part per encoder); generation uses the family's sampler and guidance (25 steps, 5.0), TEA per encoder.

Measures, per method, the time and peak accelerator memory of a training step (Textual Inversion, DreamBooth-LoRA,
Custom Diffusion; the median of the timed steps after one warm-up step), the semantic-shift tracker over 3
snapshots, and a generation batch without and with TEA (time per image, peak memory). Random weights make the
images meaningless; only time and memory are measured. Prints one table and writes --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import sync

from persviz.families import get_family
from persviz.generation import generate
from persviz.io import write_json
from persviz.sd15 import build_sd15_pipeline
from persviz.tea import tea, track_semantic_shift
from persviz.trainers import (METHODS, load_textual_inversion_run, train_custom_diffusion, train_dreambooth_lora,
                              train_textual_inversion)
from persviz.trainers.recipes import recipe

TRAIN = {"textual_inversion": train_textual_inversion, "dreambooth": train_dreambooth_lora,
         "custom_diffusion": train_custom_diffusion}



def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_sdxl_pipeline(small: bool, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """SDXL base's architecture with random weights, in memory (persviz.families.sdxl's configs; small: the reduced
    widths of the offline tests), both tokenizers CLIP's BPE as persviz builds it (tokenizer_2 pads with '!')."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from persviz.families.sdxl import SCHEDULER, TOKENIZER_2_PAD, sdxl_component_configs
    from persviz.sd15 import sd15_config_dir
    configs = sdxl_component_configs(small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te1 = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
    tok = CLIPTokenizer.from_pretrained(sd15_config_dir() / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(sd15_config_dir() / "tokenizer", pad_token=TOKENIZER_2_PAD)
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return get_family("sdxl").prepare(pipe.to(device=device, dtype=dtype), embedded=False)


def time_training(pipe, method: str, images: np.ndarray, steps: int, out: Path, device: torch.device,
                  family: str = "sd1", side: int | None = None, **changes) -> dict:
    """Seconds per step (median over steps 2..N, from the loss callback's wall clock) and peak memory. family: the
    recipes' family ('sd1', 'sdxl'); side: the training resolution (None: the recipe's); changes: config fields
    (DreamBooth-LoRA's train_text_encoder). A method the family does not train: its sentence instead."""
    from dataclasses import replace

    from persviz.families.base import UnsupportedModelError
    token = "sks" if method == "dreambooth" else "<smoke>"
    settings = dict(steps=steps, save_every=max(1, steps // 3), batch_size=1)  # 3 snapshots for the tracker
    if side is not None:
        settings["resolution"] = side
    try:
        cfg = recipe(method, token, "dog", shapesworld=False, family=family, **settings)
    except UnsupportedModelError as err:
        return {"refused": str(err)}
    if changes:
        cfg = replace(cfg, **changes)
    if method != "textual_inversion":  # a few class images only: their generation is not what is timed here
        cfg = replace(cfg, num_class_images=2, class_steps=2, class_batch_size=2)
    stamps: list[float] = []

    def tick(*_args) -> None:
        sync(device)
        stamps.append(time.perf_counter())
    _reset_peak(device)
    start = time.perf_counter()
    TRAIN[method](pipe, images, cfg, out / method, progress=False, callback=tick, load_result=False)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"steps": steps, "s_per_step": statistics.median(per_step) if per_step else None,
            "total_s": time.perf_counter() - start, "peak_gib": _peak_gib(device)}


def time_tracker(pipe, run: Path, device: torch.device) -> dict:
    prompts = ["a photo of a {} on a beach", "a {} in the snow", "a {} at night", "a painting of a {}"]
    _reset_peak(device)
    sync(device)
    start = time.perf_counter()
    track = track_semantic_shift(pipe, run, prompts, ["a photo of a {}", "a {}"], progress=False)
    sync(device)
    return {"snapshots": len(track["step"]), "s": time.perf_counter() - start, "peak_gib": _peak_gib(device)}


def time_generation(pipe, placeholder: str, n: int, steps: int, side: int, device: torch.device,
                    guidance: float = 7.0) -> dict:
    prompts = [f"a photo of a {placeholder} on a beach"] * n
    out = {}
    for label, ctx in (("without TEA", None), ("with TEA", True)):
        _reset_peak(device)
        sync(device)
        start = time.perf_counter()
        if ctx:
            with tea(pipe, placeholder, "dog"):
                generate(pipe, prompts, steps=steps, guidance=guidance, batch_size=n, height=side, width=side)
        else:
            generate(pipe, prompts, steps=steps, guidance=guidance, batch_size=n, height=side, width=side)
        sync(device)
        out[label] = {"s_per_image": (time.perf_counter() - start) / n, "peak_gib": _peak_gib(device)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU, reduced widths, 64 px (seconds)")
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl"),
                    help="sd1: SD 1.5 at 512 px (default); sdxl: SDXL base at 1024 px")
    ap.add_argument("--train-steps", type=int, default=None, help="default 6 (GPU) / 3 (--small)")
    ap.add_argument("--images", type=int, default=4, help="generation batch")
    ap.add_argument("--sampler-steps", type=int, default=None, help="default 25 (GPU) / 2 (--small)")
    ap.add_argument("--out", default="gpu_smoke.json")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.small
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not a.small:
        raise SystemExit("no CUDA device here; run with --small on a CPU (or on a GPU machine without it)")
    dtype = torch.float16 if cuda else torch.float32
    xl = a.family == "sdxl"
    side = 64 if a.small else (1024 if xl else 512)
    steps = a.train_steps or (3 if a.small else 6)
    family = get_family(a.family)
    gen = family.generation_defaults(embedded=False)
    sampler = a.sampler_steps or (2 if a.small else gen["steps"])
    if xl:
        pipe = build_sdxl_pipeline(small=a.small, dtype=dtype, device=device)
    else:
        pipe = build_sd15_pipeline(small=a.small, dtype=dtype, device=device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, side, side, 3), dtype=np.uint8)
    report: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
                    "family": a.family, "side": side, "small": a.small, "torch": torch.__version__, "train": {}}
    # SDXL: DreamBooth-LoRA with the text encoders off (the recipe) and on, each timed
    runs = [(m, m, {}) for m in METHODS] + ([("dreambooth text encoders on", "dreambooth",
                                               {"train_text_encoder": True})] if xl else [])
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, changes in runs:
            report["train"][label] = time_training(pipe, method, images, steps, Path(tmp) / label.replace(" ", "_"),
                                                   device, family=a.family, side=side, **changes)
        run = Path(tmp) / "textual_inversion" / "textual_inversion"
        report["tracker"] = time_tracker(pipe, run, device)
        load_textual_inversion_run(pipe, run)  # SDXL: each part into its encoder
        report["generation"] = time_generation(pipe, "<smoke>", a.images, sampler, side, device,
                                               guidance=gen["guidance"])
    write_json(Path(a.out), report)
    print(f"{report['device']}, {report['dtype']}, {a.family}, {side}x{side}")
    for method, r in report["train"].items():
        if "refused" in r:
            print(f"  {method:18s} refused: {r['refused']}")
            continue
        mem = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"  {method:18s} {r['s_per_step']:.3f} s/step{mem}")
    t = report["tracker"]
    print(f"  tracker            {t['s']:.2f} s over {t['snapshots']} snapshots")
    for label, r in report["generation"].items():
        mem = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"  generation {label:11s} {r['s_per_image']:.3f} s/image ({sampler} steps){mem}")
    print(json.dumps({"written": a.out}))


if __name__ == "__main__":
    main()

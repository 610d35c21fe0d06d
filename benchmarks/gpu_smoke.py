"""GPU smoke test of the full-scale path: SD 1.5's, SDXL's or FLUX.1's real architecture with random weights
(nothing to download).

    python benchmarks/gpu_smoke.py                   # one GPU, SD 1.5, 512x512, float16; at most about 8 minutes
    python benchmarks/gpu_smoke.py --family sdxl     # one GPU, SDXL base, 1024x1024, float16
    python benchmarks/gpu_smoke.py --small           # CPU, reduced widths, 64 px: seconds (checks the script itself)
    python benchmarks/gpu_smoke.py --small --family sdxl
    python benchmarks/gpu_smoke.py --flux           # FLUX.1 at 1024 px in bf16: one block of each kind, extrapolated
    python benchmarks/gpu_smoke.py --flux --small

SDXL (``--family sdxl``): the architecture of stabilityai/stable-diffusion-xl-base-1.0 (persviz.families.sdxl's
configs: UNet 2.6 B parameters, clip_l + clip_g) built in memory with random weights; the methods persviz trains on
SDXL with the family's recipes (diffusers' SDXL scripts') at 1024 px: Textual Inversion (a row per encoder),
DreamBooth-LoRA with the text encoders off (the recipe) and on (``train_text_encoder``); Custom Diffusion is refused
on SDXL and its sentence is recorded instead of a time. The tracker reads the Textual Inversion run's snapshots (one
part per encoder); generation uses the family's sampler and guidance (25 steps, 5.0), TEA per encoder.

--flux: a full-size random FLUX.1 (12 B parameters in the transformer, 4.7 B in T5) does not fit a short device run,
so one double-stream and one single-stream block of FLUX.1-dev's width (3072, 24 heads of 128) run at 1024 x 1024
(4096 image tokens and 512 T5 tokens) in bfloat16; the median forward time of each, times the 19 and 38 blocks,
gives a sampler step and FluxPipeline's 28 steps (the transformer alone: the text encoders run once, the VAE once).
Peak memory: each component's bf16 bytes from its parameter count (the published configs, built on the meta device:
nothing allocated), resident together without CPU offload, the largest one (the transformer) with
``enable_model_cpu_offload``, each plus the measured peak activation memory of a block.

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


def flux_report(small: bool, device: torch.device, repeats: int = 3) -> dict:
    """One FLUX.1 block of each kind timed at 1024 px (small: the test widths at 64 px) and extrapolated; component
    sizes from parameter counts on the meta device; peak memory with and without CPU offload (see the docstring)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from persviz.families.flux import FLUX_DEV, GENERATION, flux_component_configs, t5_test_tokenizer
    configs = flux_component_configs(FLUX_DEV, small=small)
    if small:
        configs["text_encoder_2"]["vocab_size"] = len(t5_test_tokenizer())
    with torch.device("meta"):
        parts = {"transformer": FluxTransformer2DModel.from_config(configs["transformer"]),
                 "text_encoder_2": T5EncoderModel(T5Config.from_dict(configs["text_encoder_2"])),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
                 "vae": AutoencoderKL.from_config(configs["vae"])}
    gib = {k: sum(p.numel() for p in m.parameters()) * 2 / 2**30 for k, m in parts.items()}  # bf16: 2 bytes
    t = configs["transformer"]
    dim, heads, head_dim = t["num_attention_heads"] * t["attention_head_dim"], t["num_attention_heads"], \
        t["attention_head_dim"]
    side = 64 if small else 1024
    n_img, n_txt = (side // 16) ** 2, 32 if small else GENERATION[FLUX_DEV]["max_sequence_length"]
    dtype = torch.float32 if small else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n_img, dim, generator=g).to(device, dtype)
    context = torch.randn(1, n_txt, dim, generator=g).to(device, dtype)
    temb = torch.randn(1, dim, generator=g).to(device, dtype)
    ids = torch.zeros(n_txt + n_img, 3)
    ids[n_txt:, 1] = torch.arange(n_img) // (side // 16)
    ids[n_txt:, 2] = torch.arange(n_img) % (side // 16)
    rotary = FluxPosEmbed(theta=10000, axes_dim=t["axes_dims_rope"])(ids.to(device))
    timings = {}
    for name, block in (("double", FluxTransformerBlock(dim, heads, head_dim)),
                        ("single", FluxSingleTransformerBlock(dim, heads, head_dim))):
        block = block.to(device, dtype).eval()
        times = []
        _reset_peak(device)
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first is a warm-up
                sync(device)
                start = time.perf_counter()
                block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
                sync(device)
                times.append(time.perf_counter() - start)
        block_gib = sum(p.numel() * p.element_size() for p in block.parameters()) / 2**30
        peak = _peak_gib(device)
        timings[name] = {"s": statistics.median(times[1:]),
                         "activation_peak_gib": None if peak is None else peak - block_gib}
        del block
    step = t["num_layers"] * timings["double"]["s"] + t["num_single_layers"] * timings["single"]["s"]
    act = max((r["activation_peak_gib"] or 0.0) for r in timings.values())
    return {"side": side, "image_tokens": n_img, "double_blocks": t["num_layers"],
            "single_blocks": t["num_single_layers"], "text_tokens": n_txt, "dtype": str(dtype), "blocks": timings,
            "s_per_sampler_step": step, "s_per_image_28_steps": step * GENERATION[FLUX_DEV]["steps"],
            "component_gib_bf16": gib, "peak_gib_without_offload": sum(gib.values()) + act,
            "peak_gib_with_cpu_offload": max(gib.values()) + act}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU, reduced widths, 64 px (seconds)")
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl"),
                    help="sd1: SD 1.5 at 512 px (default); sdxl: SDXL base at 1024 px")
    ap.add_argument("--train-steps", type=int, default=None, help="default 6 (GPU) / 3 (--small)")
    ap.add_argument("--images", type=int, default=4, help="generation batch")
    ap.add_argument("--sampler-steps", type=int, default=None, help="default 25 (GPU) / 2 (--small)")
    ap.add_argument("--flux", action="store_true", help="FLUX.1 at 1024 px, bf16: blocks timed and extrapolated")
    ap.add_argument("--out", default="gpu_smoke.json")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.small
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not a.small:
        raise SystemExit("no CUDA device here; run with --small on a CPU (or on a GPU machine without it)")
    if a.flux:
        r = flux_report(a.small, device)
        r["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
        write_json(Path(a.out), r)
        print(f"FLUX.1 on {r['device']}, {r['dtype']}, {r['side']}x{r['side']} ({r['image_tokens']} image + "
              f"{r['text_tokens']} text tokens)")
        for name, b in r["blocks"].items():
            print(f"  {name}-stream block   {b['s'] * 1000:.1f} ms")
        print(f"  sampler step       {r['s_per_sampler_step']:.3f} s ({r['double_blocks']} double + "
              f"{r['single_blocks']} single blocks); "
              f"{r['s_per_image_28_steps']:.1f} s an image at 28 steps (transformer only)")
        print("  components (bf16)  " + ", ".join(f"{k} {v:.2f} GiB" for k, v in r["component_gib_bf16"].items()))
        print(f"  peak, estimated    {r['peak_gib_without_offload']:.1f} GiB resident, "
              f"{r['peak_gib_with_cpu_offload']:.1f} GiB with --cpu-offload")
        print(json.dumps({"written": a.out}))
        return
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

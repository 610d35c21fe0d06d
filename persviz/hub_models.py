"""The Hugging Face Hub models persviz uses at full scale: what to download, about how big, and what for.

Their ids (`SD15`, `CLIP_L14`, `DINO`, `DINO_DREAMBENCH`, also importable from `persviz.loading`) and one table,
`HUB_MODELS` (Hub id -> `HubModel`), read by the loader's error messages (`persviz.loading`) and by
`persviz doctor`. Each entry lists the minimal files: `hf download ID --include ...` with these patterns fetches
exactly what `persviz.loading.load_pipeline` / `load_evaluator` read (fp32 safetensors only; no .bin, .ckpt,
fp16 or non-EMA copies, no safety checker: load_pipeline passes safety_checker=None). Sizes are about the fp32
parameter counts times 4 bytes.

Nothing here touches the network: `cached_files` / `is_cached` look in the local cache only.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import constants, try_to_load_from_cache

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_L14 = "openai/clip-vit-large-patch14"
DINO = "facebook/dinov2-base"  # mean-pooled, as the TEA code
DINO_DREAMBENCH = "facebook/dino-vits16"  # DINO ViT-S/16, CLS token, as DreamBench
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # the SDXL family (persviz.families.sdxl)
FLUX_DEV = "black-forest-labs/FLUX.1-dev"  # the Flux family (persviz.families.flux); gated
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"  # the Flux family's timestep-distilled model
HF_CLI = "hf"  # huggingface_hub's command line (`huggingface-cli` is gone)


@dataclass(frozen=True)
class HubModel:
    """A Hub model persviz can use: its id, `hf download --include` patterns, the files they give, size, purpose."""

    hub_id: str
    kind: str  # 'pipeline', 'clip' or 'dino' (the `kind` of persviz.loading)
    patterns: tuple[str, ...]
    files: tuple[str, ...]  # the files the loader reads (all matched by `patterns`)
    size: str
    purpose: str
    gated: bool = False  # the repository asks each user to accept its license before downloading


SD15_TOKENIZER = ("tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                  "tokenizer/vocab.json")
CLIP_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json")

HUB_MODELS: dict[str, HubModel] = {
    SD15: HubModel(
        SD15, "pipeline",
        patterns=("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                  "feature_extractor/*", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                  "vae/diffusion_pytorch_model.safetensors"),
        files=("model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
               "text_encoder/config.json", "text_encoder/model.safetensors", *SD15_TOKENIZER, "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors"),
        size="about 4.3 GB (fp32 UNet about 3.4 GB, text encoder about 0.5 GB, VAE about 0.3 GB)",
        purpose="Stable Diffusion 1.5, the full-scale pipeline of TEA, FineXL and Pigeon"),
    CLIP_L14: HubModel(
        CLIP_L14, "clip",
        patterns=("config.json", "model.safetensors", "preprocessor_config.json", *CLIP_TOKENIZER),
        files=("config.json", "model.safetensors", "preprocessor_config.json", *CLIP_TOKENIZER),
        size="about 1.7 GB",
        purpose="CLIP ViT-L/14, the full-scale CLIP-I / CLIP-T evaluator (the SD 1.5 text encoder's CLIP)"),
    DINO: HubModel(
        DINO, "dino",
        patterns=("config.json", "model.safetensors", "preprocessor_config.json"),
        files=("config.json", "model.safetensors", "preprocessor_config.json"),
        size="about 0.35 GB",
        purpose="DINOv2-base, the full-scale DINO image-similarity evaluator"),
    DINO_DREAMBENCH: HubModel(
        DINO_DREAMBENCH, "dino",  # an older repository: its weights may be only pytorch_model.bin on main
        patterns=("config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json"),
        files=("config.json", "model.safetensors", "preprocessor_config.json"),
        size="about 0.09 GB",
        purpose="DINO ViT-S/16, DreamBench's DINO-I (CLS token); optional, `load_evaluator(DINO_DREAMBENCH, kind='dino')`"),
    SDXL_BASE: HubModel(
        SDXL_BASE, "pipeline",
        patterns=("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                  "tokenizer_2/*", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                  "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
        files=("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
               *SD15_TOKENIZER, *(f.replace("tokenizer/", "tokenizer_2/") for f in SD15_TOKENIZER),
               "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors"),
        size="about 14 GB (fp32 UNet about 10.3 GB, text encoders about 0.5 and 2.8 GB, VAE about 0.3 GB)",
        purpose="Stable Diffusion XL base 1.0, the SDXL family (loaded, prepared and inspected per encoder; optional)"),
    **{hub_id: HubModel(
        hub_id, "pipeline",
        # the diffusers folders only: not the repository's own flux1-*.safetensors and ae.safetensors (the same
        # transformer and VAE in the original layout, about 24 GB more)
        patterns=("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                  "tokenizer_2/*", "text_encoder/model.safetensors", "text_encoder_2/model*.safetensors*",
                  "transformer/diffusion_pytorch_model*.safetensors*", "vae/diffusion_pytorch_model.safetensors"),
        files=("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder/model.safetensors", "text_encoder_2/config.json",
               "text_encoder_2/model.safetensors.index.json",
               *(f"text_encoder_2/model-0000{i}-of-00002.safetensors" for i in (1, 2)), *SD15_TOKENIZER,
               "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
               "transformer/diffusion_pytorch_model.safetensors.index.json",
               *(f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
               "vae/config.json", "vae/diffusion_pytorch_model.safetensors"),
        size="about 34 GB in bf16 (transformer about 23.8 GB, T5 XXL about 9.5 GB, CLIP about 0.25 GB, VAE about "
             "0.17 GB)",
        purpose=purpose, gated=gated)
      for hub_id, purpose, gated in (
          (FLUX_DEV, "FLUX.1-dev, the Flux family's default (guidance-distilled; optional)", True),
          (FLUX_SCHNELL, "FLUX.1-schnell, the Flux family's 4-step model (optional)", False))},
}


def download_command(hub_id: str) -> str:
    """The `hf download` line that fetches what persviz needs of `hub_id` (the whole repository when unknown)."""
    model = HUB_MODELS.get(hub_id)
    if model is None:
        return f"{HF_CLI} download {hub_id}"
    return f"{HF_CLI} download {hub_id} " + " ".join(f"--include {shlex.quote(p)}" for p in model.patterns)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def config_download_command(hub_id: str) -> str:
    """The `hf download` line of `hub_id`'s configuration alone (model_index.json, component configs, scheduler,
    tokenizers, no weights): what loading a single-file checkpoint of its family needs besides the file."""
    model = HUB_MODELS.get(hub_id)
    patterns = ([p for p in model.patterns if not p.endswith(WEIGHT_SUFFIXES)] if model is not None else
                ["*.json", "*/*.json", "*/*.txt"])
    return f"{HF_CLI} download {hub_id} " + " ".join(f"--include {shlex.quote(p)}" for p in patterns)


def download_hint(hub_id: str) -> str:
    """`hf download ...` with the size when known, for error messages."""
    model = HUB_MODELS.get(hub_id)
    gate = (f"; {hub_id} is a gated repository: accept its license on https://huggingface.co/{hub_id} and log in "
            f"with `{HF_CLI} auth login` first" if model is not None and model.gated else "")
    return f"`{download_command(hub_id)}`" + (f", {model.size}" if model else "") + gate


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder in use now: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_files(hub_id: str, cache_dir: Optional[Union[str, Path]] = None) -> dict[str, Optional[str]]:
    """{file: local path or None} for the files persviz reads of `hub_id`, looked up in the cache (no network)."""
    model = HUB_MODELS[hub_id]
    folder = str(cache_dir or hub_cache_dir())
    out = {}
    for name in model.files:
        found = try_to_load_from_cache(hub_id, name, cache_dir=folder)
        out[name] = found if isinstance(found, str) else None
    return out


def is_cached(hub_id: str, cache_dir: Optional[Union[str, Path]] = None) -> bool:
    """True when every file persviz reads of `hub_id` is in the local Hugging Face cache."""
    return all(cached_files(hub_id, cache_dir).values())

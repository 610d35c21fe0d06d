"""Stable Diffusion 1.x as a persviz family: one CLIP text encoder (ViT-L/14, width 768; ShapesWorld's micro-SD
has the same architecture at width 128), 512 px, the TEA paper's DPM-Solver++ sampling at full scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persviz.families.base import Pipeline
from persviz.families.base import Family

SD1_WIDTH = 768  # CLIP ViT-L/14's text width: SD 1.x
SD2_WIDTH = 1024  # OpenCLIP ViT-H's: SD 2.x (SDXL has two text encoders)


@dataclass(frozen=True)
class StableDiffusion1(Family):
    """SD 1.x pipelines (diffusers' StableDiffusionPipeline), the embedded micro-SD and reduced-width test models."""

    def refusal(self, pipe: Pipeline, model: str) -> str | None:
        kind = type(pipe).__name__
        if getattr(pipe, "text_encoder_2", None) is not None or "XL" in kind:
            return (f"{model} is an SDXL pipeline ({kind}, two text encoders), not a Stable Diffusion 1.x one (one "
                    "CLIP text encoder); the SDXL family takes it, or use stable-diffusion-v1-5/stable-diffusion-v1-5")
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None:
            return f"{model} ({kind}) has no CLIP text encoder; it is not a Stable Diffusion 1.x pipeline"
        width = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if width == SD2_WIDTH:
            return (f"{model} has a text encoder of width {width} (OpenCLIP ViT-H: Stable Diffusion 2.x), not SD "
                    f"1.x's {SD1_WIDTH}; persviz supports Stable Diffusion 1.x and SDXL, not 2.x: use "
                    "stable-diffusion-v1-5/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0")
        return None

    def text_stack(self, pipe: Pipeline) -> Any:
        from persviz.text_stack import TextEncoder, TextStack  # heavy: torch
        return TextStack((TextEncoder("clip_l", pipe.tokenizer, pipe.text_encoder),))

    def write_test_cache(self, cache_dir: Any, small: bool = True, seed: int = 0) -> dict[str, Any]:
        from persviz.sd15 import write_offline_hub_cache  # heavy: diffusers, transformers
        return write_offline_hub_cache(cache_dir, small=small, seed=seed)

    def prepare(self, pipe: Pipeline, embedded: bool) -> Any:
        """At full scale the TEA paper's sampler: DPM-Solver++ (from the pipeline's own scheduler config) and VAE
        slicing (one image decoded at a time, so 512 px batches fit a small GPU); the embedded model as saved."""
        if not embedded:
            from diffusers import DPMSolverMultistepScheduler  # heavy: diffusers
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
            pipe.vae.enable_slicing()
        return pipe


FAMILY = StableDiffusion1(
    "sd1", "Stable Diffusion 1.x", hub_ids=("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    generation={"steps": 50, "guidance": 7.0, "batch_size": 8},
    embedded_generation={"steps": 25, "guidance": 4.0, "batch_size": 50})

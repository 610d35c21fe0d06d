"""Stable Diffusion 1.x as a persviz family: one CLIP text encoder (ViT-L/14, width 768; ShapesWorld's micro-SD
has the same architecture at width 128), 512 px, the TEA paper's DPM-Solver++ sampling at full scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persviz.families.base import Pipeline
from persviz.families.base import Family
from persviz.tokens import SHAPESWORLD_SAMPLING

SD1_WIDTH = 768  # CLIP ViT-L/14's text width: SD 1.x
SD2_WIDTH = 1024  # OpenCLIP ViT-H's: SD 2.x (SDXL has two text encoders)
SHAPESWORLD_TEMPLATES = ("a {}", "a photo of a {}", "an image of a {}", "a picture of a {}")  # its captions' grammar

# The TEA paper's settings (docs/tea.md §8): Textual Inversion lr 5e-4, batch 1, 3000 steps, a snapshot every 100;
# DreamBooth-LoRA rank 4, lr 1e-4, text encoder trained, prior preservation weight 1.0 with class images from the
# base model; Custom Diffusion lr 5e-6, 2000 steps, cross-attention K/V. Where the paper and diffusers' example
# scripts differ the paper's hyper-parameters are used, with the examples' image preprocessing (the trainers'
# defaults: centre crop, bicubic resize; flips for Textual Inversion). The LoRA fine-tune keeps its config's
# defaults (FineXL's, on the micro-SD, the one model it is used on).
PAPER_RECIPES = {
    "textual_inversion": {"lr": 5e-4, "steps": 3000, "save_every": 100, "batch_size": 1},
    "dreambooth": {"rank": 4, "lr": 1e-4, "train_text_encoder": True, "prior_preservation": True,
                   "prior_loss_weight": 1.0},
    "custom_diffusion": {"lr": 5e-6, "steps": 2000},
    "lora_finetune": {},
}
# ShapesWorld's micro-SD changes (the reasons beside each): its shipped runs were trained with these.
SHAPESWORLD_RECIPES = {
    # 1e-3 so the drift the paper sees on SD 1.5 happens in 3000 steps on 128-d rows; its captions' grammar
    "textual_inversion": {"lr": 1e-3, "templates": SHAPESWORLD_TEMPLATES},
    # at the paper's 1e-4 the micro-SD's LoRA learned the concepts too little to measure
    "dreambooth": {"lr": 1e-3, "save_every": 100, **SHAPESWORLD_SAMPLING},
    # 5e-6 leaves the micro-SD's small projections unchanged; no resize augmentation on 16x16
    "custom_diffusion": {"steps": 1000, "lr": 1e-4, "save_every": 100, "augment": False, **SHAPESWORLD_SAMPLING},
}


@dataclass(frozen=True)
class StableDiffusion1(Family):
    """SD 1.x pipelines (diffusers' StableDiffusionPipeline), the embedded micro-SD and reduced-width test models."""

    def refusal(self, pipe: Pipeline, model: str) -> str | None:
        kind = type(pipe).__name__
        if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
            return (f"{model} ({kind}) is a diffusion transformer, not a Stable Diffusion 1.x pipeline (a UNet and one "
                    "CLIP text encoder); use stable-diffusion-v1-5/stable-diffusion-v1-5")
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

    def unet_condition(self, stack: Any, ids: Any, real_ids: Any, size: tuple[int, int], resolution: int) -> Any:
        """The text encoder's last hidden state (StableDiffusionPipeline's prompt embeddings); no added conditions."""
        return stack.primary.encoder(ids[0])[0], None

    def prompt_states(self, stack: Any, tokens: Any) -> Any:
        """StableDiffusionPipeline.encode_prompt's prompt embeddings: the encoder's last hidden state (with the
        attention mask where its config asks for one), in the encoder's dtype; no pooled embedding."""
        encoder = stack.primary.encoder
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens[0]["attention_mask"].to(encoder.device)
        hidden = encoder(tokens[0]["input_ids"].to(encoder.device), attention_mask=mask)[0]
        return [hidden.to(dtype=encoder.dtype, device=encoder.device)], None

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
    embedded_generation={"steps": 25, "guidance": 4.0, "batch_size": 50},
    recipes=PAPER_RECIPES, embedded_recipes=SHAPESWORLD_RECIPES,
    # LoRA files only SD 1.x's hold: kohya's one text encoder (lora_te_, SDXL's are lora_te1_ / lora_te2_) and
    # attention in the UNet's first down block and last up block (SDXL's and the micro-SD's have none there)
    lora_marks=("lora.te.", "down.blocks.0.attentions.", "up.blocks.3.attentions."),
    # single-file checkpoints: CLIP ViT-L under cond_stage_model.transformer. (SD 2.x: cond_stage_model.model.)
    checkpoint_prefix="cond_stage_model.transformer.", pipeline_class="StableDiffusionPipeline")

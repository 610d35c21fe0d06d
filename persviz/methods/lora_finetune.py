"""The UNet LoRA fine-tune on captioned images as a persviz method (FineXL's personalized models of known level).

It personalizes no concept token: its data is (images, captions) and its runs are explained by FineXL, not studied
by TEA. Added as one module (this one) and one line of the registry, the proof that a method needs nothing more.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.families.base import Pipeline
from persviz.methods.base import LoRAMethod, lora_loaded


@dataclass(frozen=True)
class LoRAFinetune(LoRAMethod):
    """Text-to-image LoRA on the UNet (diffusers' train_text_to_image_lora.py); images come with their captions."""

    def config(self, token: str, class_word: str, settings: dict[str, Any]) -> Any:
        from persviz.trainers.lora_finetune import LoRAFinetuneConfig  # heavy: the trainers
        return LoRAFinetuneConfig(**settings)  # no token: its data is (images, captions)

    def train(self, pipe: Pipeline, images: Any, config: Any, out: Path, progress: bool = True,
              load_result: bool = False) -> Any:
        """images: (uint8 images [N, H, W, 3], one caption per image)."""
        from persviz.trainers.lora_finetune import train_lora_finetune  # heavy: the trainers
        pixels, captions = images
        return train_lora_finetune(pipe, pixels, captions, config, out, progress=progress, load_result=load_result)

    def loaded(self, pipe: Pipeline, run: Path) -> contextlib.AbstractContextManager[None]:
        from persviz.trainers.lora_finetune import load_lora  # heavy: the trainers
        return lora_loaded(pipe, lambda: load_lora(pipe, Path(run)))


METHOD = LoRAFinetune(
    "lora_finetune", "lora-finetune", learns_token=False, tea_level="none", concept_method=False, weights="lora",
    looked_for="pytorch_lora_weights.safetensors / .bin (persviz, diffusers' train_text_to_image_lora.py) or a LoRA "
               "file in kohya's / A1111's layout (lora_unet_*.lora_down.weight)")

"""DreamBooth-LoRA as a persviz method: LoRA adapters bound to a rare identifier ('sks'), prompt-level TEA."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.families.base import Pipeline
from persviz.methods.base import LoRAMethod, lora_loaded
from persviz.tokens import DREAMBOOTH_IDENTIFIER, check_identifier


@dataclass(frozen=True)
class DreamBoothLoRA(LoRAMethod):
    """DreamBooth with LoRA (Ruiz et al.; diffusers' train_dreambooth_lora.py): TEA on the prompt's hidden states."""

    def config(self, token: str, class_word: str, settings: dict[str, Any]) -> Any:
        from persviz.trainers.dreambooth_lora import DreamBoothLoRAConfig  # heavy: the trainers
        return DreamBoothLoRAConfig(identifier=token, class_word=class_word,
                                    instance_prompt=f"a photo of a {token} {class_word}",
                                    class_prompt=f"a photo of a {class_word}", **settings)

    def train(self, pipe: Pipeline, images: Any, config: Any, out: Path, progress: bool = True,
              load_result: bool = False) -> Any:
        if getattr(pipe, "transformer", None) is not None:  # a diffusion transformer (FLUX.1): its own step
            from persviz.trainers.dreambooth_lora_flux import train_transformer_lora  # heavy: the trainers
            return train_transformer_lora(pipe, images, config, out, progress=progress, load_result=load_result)
        from persviz.trainers.dreambooth_lora import train_dreambooth_lora  # heavy: the trainers
        return train_dreambooth_lora(pipe, images, config, out, progress=progress, load_result=load_result)

    def loaded(self, pipe: Pipeline, run: Path) -> contextlib.AbstractContextManager[None]:
        from persviz.trainers.dreambooth_lora import load_dreambooth_lora  # heavy: the trainers
        return lora_loaded(pipe, lambda: load_dreambooth_lora(pipe, Path(run)))

    def check_tokens(self, tokenizer: Any, token: str, class_word: str) -> None:
        check_identifier(token)


METHOD = DreamBoothLoRA(
    "dreambooth", "dreambooth", learns_token=False, tea_level="prompt", weights="lora", tea_rotation=0.1,
    tea_scale=0.5,
    looked_for="pytorch_lora_weights.safetensors / .bin (persviz, diffusers' train_dreambooth_lora.py) or a LoRA file "
               "in kohya's / A1111's layout (lora_unet_*.lora_down.weight)")
IDENTIFIER = DREAMBOOTH_IDENTIFIER

"""Custom Diffusion as a persviz method: cross-attention K/V and a modifier token's row, token-level TEA."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persviz.families.base import Pipeline
from persviz.methods.base import Method
from persviz.tokens import SHAPESWORLD_SAMPLING, check_new_token_and_class_word


@dataclass(frozen=True)
class CustomDiffusion(Method):
    """Custom Diffusion (Kumari et al.; diffusers' train_custom_diffusion.py): K/V processors plus a modifier token."""

    def recipe(self, token: str, class_word: str, shapesworld: bool, **overrides: Any) -> Any:
        from persviz.trainers.custom_diffusion import CustomDiffusionConfig  # heavy: the trainers
        from persviz.trainers.recipes import apply_overrides  # heavy: the trainers

        cfg = CustomDiffusionConfig(modifier_token=token, class_word=class_word,
                                    instance_prompt=f"a photo of a {token} {class_word}")
        if shapesworld:  # 5e-6 leaves the micro-SD's small projections unchanged; no resize augmentation on 16x16
            cfg = replace(cfg, steps=1000, lr=1e-4, save_every=100, augment=False, **SHAPESWORLD_SAMPLING)
        return apply_overrides(cfg, overrides)

    def train(self, pipe: Pipeline, images: Any, config: Any, out: Path, progress: bool = True,
              load_result: bool = False) -> Any:
        from persviz.trainers.custom_diffusion import train_custom_diffusion  # heavy: the trainers
        return train_custom_diffusion(pipe, images, config, out, progress=progress, load_result=load_result)

    @contextlib.contextmanager
    def loaded(self, pipe: Pipeline, run: Path) -> Iterator[None]:
        from persviz.trainers.custom_diffusion import load_custom_diffusion  # heavy: the trainers
        procs = dict(pipe.unet.attn_processors)
        before = set(pipe.tokenizer.get_added_vocab())
        vocab = pipe.text_encoder.config.vocab_size  # diffusers' unload leaves it grown (see textual_inversion.py)
        load_custom_diffusion(pipe, Path(run))
        try:
            yield
        finally:
            pipe.unet.set_attn_processor(procs)
            pipe.unload_textual_inversion(sorted(set(pipe.tokenizer.get_added_vocab()) - before))
            pipe.text_encoder.config.vocab_size = vocab

    def snapshots(self, run: Path) -> list[tuple[int, Path]]:
        from persviz.trainers.custom_diffusion import list_custom_diffusion_snapshots  # heavy: the trainers
        return list_custom_diffusion_snapshots(run)

    def check_tokens(self, tokenizer: Any, token: str, class_word: str) -> None:
        check_new_token_and_class_word(tokenizer, token, class_word)


METHOD = CustomDiffusion("custom_diffusion", "custom-diffusion", learns_token=True,
                         tea_level="token", weights="attention_kv")

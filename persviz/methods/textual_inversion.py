"""Textual Inversion as a persviz method: one new token row learned (diffusers' learned_embeds snapshots)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persviz.families.base import Pipeline
from persviz.methods.base import Method
from persviz.tokens import check_new_token_and_class_word


@dataclass(frozen=True)
class TextualInversion(Method):
    """Textual Inversion (Gal et al.): token-level TEA on the learned row; its snapshots are the row over steps."""

    def recipe(self, token: str, class_word: str, shapesworld: bool, **overrides: Any) -> Any:
        from persviz.trainers.recipes import SHAPESWORLD_TEMPLATES, apply_overrides  # heavy: the trainers
        from persviz.trainers.textual_inversion import TextualInversionConfig  # heavy: the trainers

        cfg = TextualInversionConfig(placeholder=token, initializer=class_word)
        if shapesworld:  # 1e-3 so the drift the paper sees on SD 1.5 happens in 3000 steps on 128-d rows
            cfg = replace(cfg, lr=1e-3, templates=SHAPESWORLD_TEMPLATES)
        overrides.pop("num_class_images", None)  # no class images in Textual Inversion
        return apply_overrides(cfg, overrides)

    def train(self, pipe: Pipeline, images: Any, config: Any, out: Path, progress: bool = True,
              load_result: bool = False) -> Any:
        from persviz.trainers.textual_inversion import train_textual_inversion  # heavy: the trainers
        return train_textual_inversion(pipe, images, config, out, progress=progress, load_result=load_result)

    @contextlib.contextmanager
    def loaded(self, pipe: Pipeline, run: Path) -> Iterator[None]:
        from persviz.trainers.textual_inversion import load_textual_inversion_run  # heavy: the trainers
        vocab = pipe.text_encoder.config.vocab_size  # diffusers' unload leaves it grown; a later LoRA save would
        tokens = load_textual_inversion_run(pipe, Path(run))  # then hold the embedding matrix (any format, by content)
        try:
            yield
        finally:
            pipe.unload_textual_inversion(tokens)
            pipe.text_encoder.config.vocab_size = vocab

    def snapshots(self, run: Path) -> list[tuple[int, Path]]:
        from persviz.trainers.textual_inversion import list_snapshots  # heavy: the trainers
        return list_snapshots(run)

    def check_tokens(self, tokenizer: Any, token: str, class_word: str) -> None:
        check_new_token_and_class_word(tokenizer, token, class_word)


METHOD = TextualInversion("textual_inversion", "textual-inversion", aliases=("ti",), learns_token=True,
                          tea_level="token", row_snapshots=True, needs_class_word=False)

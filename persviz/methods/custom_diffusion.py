"""Custom Diffusion as a persviz method: cross-attention K/V and a modifier token's row, token-level TEA."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.errors import ConceptFolderError
from persviz.families.base import Pipeline
from persviz.methods.adoption import ForeignRun, another_model, not_found, persviz_config
from persviz.methods.base import Method
from persviz.tokens import check_new_token_and_class_word


@dataclass(frozen=True)
class CustomDiffusion(Method):
    """Custom Diffusion (Kumari et al.; diffusers' train_custom_diffusion.py): K/V processors plus a modifier token."""

    def config(self, token: str, class_word: str, settings: dict[str, Any]) -> Any:
        from persviz.trainers.custom_diffusion import CustomDiffusionConfig  # heavy: the trainers
        return CustomDiffusionConfig(modifier_token=token, class_word=class_word,
                                     instance_prompt=f"a photo of a {token} {class_word}", **settings)

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

    def detect_run(self, path: Path, token: str | None = None) -> ForeignRun:
        """diffusers' (or persviz's) K/V weights with the modifier token's embedding beside them."""
        from persviz.embedding_files import read_embedding_file  # heavy: torch
        from persviz.trainers.custom_diffusion import (KEY_MARK, custom_diffusion_embeddings,  # heavy: trainers
                                                       custom_diffusion_weights, read_custom_diffusion_weights)
        try:
            weights = custom_diffusion_weights(path)
            sd = read_custom_diffusion_weights(weights)
        except (FileNotFoundError, ValueError) as err:
            raise not_found(self, path, str(err)) from None
        if not sd or not all(KEY_MARK in k for k in sd):
            raise not_found(self, path, f"{weights.name} has keys {sorted(sd)[:3]}")
        embeds = custom_diffusion_embeddings(weights.parent)
        tokens = {read_embedding_file(e).token: e for e in embeds}
        if token is None:
            if not tokens:
                raise ConceptFolderError(f"found no modifier token in {weights.parent} (no learned_embeds.safetensors "
                                         "or <token>.bin embedding); pass --token with the token the run was trained "
                                         "with")
            if len(tokens) > 1:
                raise ConceptFolderError(f"{weights.parent} holds several modifier tokens "
                                         f"({', '.join(sorted(tokens))}); pass --token with the concept's")
            token = next(iter(tokens))
        elif tokens and token not in tokens:
            raise ConceptFolderError(f"{weights.parent} holds the modifier token(s) {', '.join(sorted(tokens))}, not "
                                     f"{token!r}; pass one of them with --token")
        cfg = persviz_config(weights.parent)
        source = "persviz" if cfg.get("modifier_token") else "diffusers"
        return ForeignRun(self.name, path, source, token, cfg.get("class_word"), (weights, *embeds))

    def check_run_files(self, found: ForeignRun, pipe: Pipeline, text: Any) -> None:
        """The token's embeddings against the text encoder's width; every K/V weight against the UNet's layer of
        that name and shape."""
        from persviz.embedding_files import check_fits, read_embedding_file  # heavy: torch
        from persviz.trainers.custom_diffusion import read_custom_diffusion_weights  # heavy: the trainers
        weights, *embeds = found.files
        for e in embeds:
            check_fits(read_embedding_file(e), text.encoder)
        procs = pipe.unet.attn_processors
        for key, v in read_custom_diffusion_weights(weights).items():
            layer, _, sub = key.partition(".processor.")
            if layer + ".processor" not in procs:
                raise ConceptFolderError(f"{weights.name} holds weights of a layer {layer!r} the model's UNet does "
                                         "not have: the run was trained on another model; pass it with --model")
            if not sub.endswith("weight"):
                continue
            base = pipe.unet.get_submodule(layer)
            proj = sub.split(".")[0].replace("_custom_diffusion", "")
            target = base.to_out[0] if proj == "to_out" else getattr(base, proj, None)
            if target is not None and tuple(v.shape) != tuple(target.weight.shape):
                raise another_model(f"{key} of shape {tuple(v.shape)}", int(v.shape[-1]),
                                    int(target.weight.shape[-1]))


METHOD = CustomDiffusion(
    "custom_diffusion", "custom-diffusion", learns_token=True, tea_level="token", weights="attention_kv",
    looked_for="pytorch_custom_diffusion_weights.safetensors / .bin (persviz, diffusers' train_custom_diffusion.py) "
               "with learned_embeds.safetensors or <token>.bin")

"""The protocol every personalization method implements: how it is trained, loaded into a pipeline and undone,
which token it learns, how TEA applies to it. One module per method beside this one; ``persviz.methods`` is the
registry. Nothing outside ``persviz/methods/`` compares a method's name: code asks the method object instead.

This module and the method modules import no heavy library at their top, so the command line can list the methods
without loading torch; each method imports its trainer when it runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from persviz.errors import ConceptFolderError
from persviz.families import get_family, text_stack
from persviz.families.base import Pipeline
from persviz.methods.adoption import ForeignRun, check_lora_fits, detect_lora_run


# The settings a caller may override in any method's recipe, by their command-line names.
OVERRIDES = ("steps", "save_every", "resolution", "lr", "batch_size", "seed", "num_class_images",
             "train_text_encoder")


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """cfg with the given settings (OVERRIDES) where not None; a setting the config does not have (num_class_images
    in Textual Inversion, which takes no class images) is left out; a ValueError naming an unknown one."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {sorted(OVERRIDES)}")
    has = {f.name for f in fields(cfg)}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k in has})


@dataclass(frozen=True)
class Method:
    """One personalization method (subclassed once per method module).

    name: the one name in code, JSON keys and folders ('textual_inversion'); cli_name: on the command line
    ('textual-inversion'); aliases: other names accepted ('ti'). learns_token: trains a new token row (Textual
    Inversion, Custom Diffusion) rather than binding an existing identifier (DreamBooth). tea_level: 'token' (Eq. 1
    on the learned row) or 'prompt' (Eq. 2 on the prompt's hidden states). row_snapshots: its snapshots are rows of
    the learned token over steps (what the semantic-shift tracker reads). concept_method: personalizes a concept
    (the three of the TEA paper); False for a method used elsewhere (FineXL's LoRA fine-tune). needs_class_word:
    prompts name the class word beside the token ('sks dog', '<new1> dog'); Textual Inversion's token stands alone.
    weights: what its run files hold: 'token_rows' (learned embeddings), 'lora' (LoRA adapters), 'attention_kv'
    (Custom Diffusion's K/V weights with the modifier token's row); a description: adopting another tool's run asks
    the method (``detect_run``, ``check_run_fits``), and methods of one kind share their implementation (LoRAMethod). tea_rotation,
    tea_scale: the knobs of the TEA paper's runs for the method (its public code's rho and alpha)."""

    name: str
    cli_name: str
    aliases: tuple[str, ...] = ()
    learns_token: bool = True
    tea_level: str = "token"
    row_snapshots: bool = False
    concept_method: bool = True
    needs_class_word: bool = True
    weights: str = "token_rows"
    tea_rotation: float = 0.2
    tea_scale: float = 0.5
    looked_for: str = ""

    def slot_word(self, token: str, class_word: str) -> str:
        """What fills a probe's slot: the learned token alone, or with the class word ('sks dog', '<new1> dog')."""
        return f"{token} {class_word}" if self.needs_class_word else token

    def concept_placeholder(self, token: str) -> str:
        """The concept's placeholder for a run that learned `token` (DreamBooth's identifier gets brackets)."""
        return token if self.learns_token else f"<{token}>"

    def condition(self, step: int | None = None) -> str:
        """A condition's name in the studies: the method, with the step where its snapshots are rows over steps."""
        return f"{self.name} step {step}" if self.row_snapshots and step is not None else self.name

    def recipe(self, token: str, class_word: str, shapesworld: bool, family: Any = None, **overrides: Any) -> Any:
        """The run's config learning `token` for a concept of class `class_word`: the settings the model's family
        gives this method (``Family.recipe_settings``: SD 1.x the TEA paper's, its embedded micro-SD ShapesWorld's
        when `shapesworld`, SDXL diffusers' SDXL example scripts'), then `overrides` (OVERRIDES) where not None.
        family: a persviz.families Family or its name; None: SD 1.x."""
        settings = get_family(family).recipe_settings(self, embedded=shapesworld)
        return apply_overrides(self.config(token, class_word, settings), overrides)

    def config(self, token: str, class_word: str, settings: dict[str, Any]) -> Any:
        """The method's run config (its trainer's dataclass) for `token` and `class_word` with a family's settings."""
        raise NotImplementedError

    def train(self, pipe: Pipeline, images: Any, config: Any, out: Path, progress: bool = True,
              load_result: bool = False) -> Any:
        """Train (or resume) a run into `out` with the method's trainer; returns its result."""
        raise NotImplementedError

    @contextlib.contextmanager
    def loaded(self, pipe: Pipeline, run: Path) -> Iterator[None]:
        """The pipeline with a finished run loaded; undone on exit."""
        raise NotImplementedError
        yield

    def snapshots(self, run: Path) -> list[tuple[int, Path]]:
        """(step, path) of the run's saved snapshots or checkpoints, by step."""
        raise NotImplementedError

    def check_tokens(self, tokenizer: Any, token: str, class_word: str) -> None:
        """Before anything is written: the token and class word against the tokenizer (a ValueError saying why)."""

    def detect_run(self, path: Path, token: str | None = None) -> ForeignRun:
        """The run of this method at `path` (an existing, resolved path) that another tool (or persviz) wrote, as
        found from the files' content: its format ('source'), token and, where recorded, class word; `token`
        replaces what is found where the format allows. A ConceptFolderError (a ValueError) saying what was looked
        for, or asking for --token, otherwise. ``persviz adopt`` reaches it through ``foreign_runs.detect_run``."""
        raise ConceptFolderError(f"persviz does not adopt {self.name} runs of other tools yet; train it with "
                                 f"persviz instead")

    def check_run_files(self, found: ForeignRun, pipe: Pipeline, text: Any) -> None:
        """The found run's files against the model: widths and layer names (`text`: the pipeline's primary text
        encoder, persviz.text_stack.TextEncoder); a ConceptFolderError or EmbeddingFileError saying "trained on
        another model"."""

    def check_run_fits(self, found: ForeignRun, pipe: Pipeline, class_word: str) -> None:
        """Errors before anything is written: the run's files against the model (``check_run_files``), then its token
        and class word against the tokenizer (``check_tokens``)."""
        text = text_stack(pipe).primary
        self.check_run_files(found, pipe, text)
        try:
            self.check_tokens(text.tokenizer, found.token, class_word)
        except ValueError as err:
            raise ConceptFolderError(f"{err} (pass the run's own with --token / --class-word)") from None


@contextlib.contextmanager
def lora_loaded(pipe: Any, load: Any) -> Iterator[None]:
    """load() puts LoRA adapters into the pipeline; they are unloaded on exit (also after an exception)."""
    load()
    try:
        yield
    finally:
        pipe.unload_lora_weights()


def lora_snapshots(run: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint-k/pytorch_lora_weights.safetensors) of a LoRA run, by step."""
    from persviz.trainers.dreambooth_lora import list_lora_snapshots  # heavy: the trainers
    return list_lora_snapshots(run)


@dataclass(frozen=True)
class LoRAMethod(Method):
    """A method whose runs are LoRA adapters (DreamBooth-LoRA, the LoRA fine-tune): one implementation of their
    snapshots and of adopting another tool's LoRA run (persviz.methods.adoption), shared rather than copied."""

    def snapshots(self, run: Path) -> list[tuple[int, Path]]:
        return lora_snapshots(run)

    def detect_run(self, path: Path, token: str | None = None) -> ForeignRun:
        return detect_lora_run(self, path, token)

    def check_run_files(self, found: ForeignRun, pipe: Pipeline, text: Any) -> None:
        check_lora_fits(found, pipe)


__all__ = ["OVERRIDES", "ForeignRun", "LoRAMethod", "Method", "apply_overrides", "lora_loaded", "lora_snapshots"]

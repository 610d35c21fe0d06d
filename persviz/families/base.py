"""The protocol every model family implements: how its pipeline is loaded and checked, its text encoders, its
generation defaults, the Hub ids it is tested under. One module per family beside this one; ``persviz.families``
is the registry and the one pipeline assembler. Nothing outside ``persviz/families/`` compares a family's name.

This module imports no heavy library at its top; a family imports diffusers when it loads a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Pipeline(Protocol):
    """What persviz uses of a diffusers text-to-image pipeline (any family): its denoiser, VAE and scheduler, and a
    call that generates; its text encoders are reached through ``persviz.families.text_stack(pipe)``."""

    unet: Any
    vae: Any
    scheduler: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Family:
    """One model family (subclassed once per family module).

    name: its one name ('sd1'); label: for people ('Stable Diffusion 1.x'); hub_ids: the Hub models persviz knows
    of this family (the first is the default at full scale); generation: the sampling of its paper-scale studies
    (steps, guidance, batch size), embedded_generation: that of an embedded model of the family (ShapesWorld's);
    trains: whether persviz's trainers take its pipelines."""

    name: str
    label: str
    hub_ids: tuple[str, ...] = ()
    generation: dict[str, Any] = field(default_factory=dict)
    embedded_generation: dict[str, Any] = field(default_factory=dict)
    trains: bool = True  # whether persviz's trainers take its pipelines (False: studied and inspected only, so far)

    def refusal(self, pipe: Pipeline, model: str) -> str | None:
        """None when `pipe` belongs to this family; else one sentence saying what it is and what persviz takes."""
        raise NotImplementedError

    def text_stack(self, pipe: Pipeline) -> Any:
        """The pipeline's text encoders in order (persviz.text_stack.TextStack)."""
        raise NotImplementedError

    def prepare(self, pipe: Pipeline, embedded: bool) -> Any:
        """The pipeline set up for persviz's studies (sampler, memory); returns it, changed in place."""
        return pipe

    def download_commands(self) -> list[str]:
        """The minimal `hf download` line of each of its Hub models (what `persviz doctor` and the offline errors
        print)."""
        from persviz.hub_models import download_command  # heavy: huggingface_hub
        return [download_command(h) for h in self.hub_ids]

    def write_test_cache(self, cache_dir: Any, small: bool = True, seed: int = 0) -> dict[str, Any]:
        """Reduced-width random components of its architecture written into a Hugging Face cache under its real
        Hub ids (the offline tests of the full-scale path); {hub id: snapshot folder}."""
        raise NotImplementedError

    def generation_defaults(self, embedded: bool) -> dict[str, Any]:
        """steps, guidance and batch size of generation for an embedded model of the family or a full-scale one."""
        return dict(self.embedded_generation if embedded else self.generation)


__all__ = ["Family", "Pipeline"]

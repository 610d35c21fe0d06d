"""The protocol every model family implements: how its pipeline is loaded and checked, its text encoders, its
generation defaults, the Hub ids it is tested under. One module per family beside this one; ``persviz.families``
is the registry and the one pipeline assembler. Nothing outside ``persviz/families/`` compares a family's name.

This module imports no heavy library at its top; a family imports diffusers when it loads a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from persviz.errors import PersvizError


class UnsupportedModelError(PersvizError, ValueError):
    """A pipeline of no family persviz supports, or a method a family has no recipe for; the message says what it
    is and what persviz takes."""


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
    trains: whether persviz's trainers take its pipelines. recipes: {method name: the settings of its run config}
    for the family's models (the fields of the method's config: lr, steps, save_every, resolution, ...; the source
    of each value in a comment beside it); embedded_recipes: {method name: the settings an embedded model of the
    family (ShapesWorld's micro-SD) changes}. A method without a recipe is refused on the family with a sentence.
    checkpoint_prefix: a key prefix only the family's single-file checkpoints hold (the original layout A1111,
    ComfyUI and Forge load); pipeline_class: the diffusers pipeline class that loads them (``from_single_file``,
    with the configuration of ``hub_ids[0]`` from the local cache)."""

    name: str
    label: str
    hub_ids: tuple[str, ...] = ()
    generation: dict[str, Any] = field(default_factory=dict)
    embedded_generation: dict[str, Any] = field(default_factory=dict)
    trains: bool = True  # whether persviz's trainers take its pipelines (False: studied and inspected only, so far)
    trains_only: tuple[str, ...] = ()  # when set, the only methods persviz trains on it so far (their names)
    adopts: bool = True  # whether `persviz adopt` takes runs trained on it
    adopts_only: tuple[str, ...] = ()  # when set, the only methods whose runs `persviz adopt` takes on it so far
    lora_marks: tuple[str, ...] = ()  # key fragments only its LoRA files hold ('_' read as '.'; see claims_lora)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    embedded_recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    no_recipe: dict[str, str] = field(default_factory=dict)  # method name: why the family has no recipe for it
    checkpoint_prefix: str = ""
    pipeline_class: str = ""
    gpu_dtype: str = "float16"  # the torch dtype its pipelines load in on a GPU (Flux: bfloat16)

    def refusal(self, pipe: Pipeline, model: str) -> str | None:
        """None when `pipe` belongs to this family; else one sentence saying what it is and what persviz takes."""
        raise NotImplementedError

    def text_stack(self, pipe: Pipeline) -> Any:
        """The pipeline's text encoders in order (persviz.text_stack.TextStack)."""
        raise NotImplementedError

    def unet_condition(self, stack: Any, ids: Any, real_ids: Any, size: tuple[int, int], resolution: int) -> Any:
        """What the UNet reads for a batch of prompts while training: (encoder_hidden_states, added_cond_kwargs or
        None). stack: the pipeline's text stack; ids: per encoder, the token ids [B, L] it is fed (a placeholder's
        positions read its initializer, the learned rows come from hooks); real_ids: the same with the placeholder's
        own ids (what the pipeline feeds once the token is loaded); size: (h, w) of the training images before
        resizing; resolution: the side they are trained at."""
        raise NotImplementedError

    def prompt_states(self, stack: Any, tokens: Any) -> Any:
        """What the family's pipeline reads for prompts, as its ``encode_prompt`` makes it: (one hidden-state tensor
        [B, L, D_e] per encoder of `stack`, in its order and the dtype the pipeline passes on, the pooled embedding
        [B, P] the UNet reads besides or None where the family has none). tokens: per encoder, its tokenizer's
        output for the prompts (``input_ids``, ``attention_mask``; padded to the tokenizer's maximum length). The
        hidden states of ``state_encoders`` concatenated along the last dimension are the pipeline's
        ``prompt_embeds`` (SD 1.x, SDXL: every encoder's; Flux: T5's, CLIP reaching it through the pooled output)."""
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

    def claims_checkpoint(self, keys: Any) -> bool:
        """Whether a single-file checkpoint with these state-dict keys is of this family."""
        return bool(self.checkpoint_prefix) and any(str(k).startswith(self.checkpoint_prefix) for k in keys)

    def claims_lora(self, keys: Any) -> str | None:
        """The first of ``lora_marks`` a LoRA file's keys hold (each key read with '_' as '.', so diffusers' and
        kohya's names compare alike: 'text_encoder_2.' and 'lora_te2_' both read 'text.encoder.2.' / 'lora.te2.'),
        or None: the file is of this family by its structure, whatever its widths."""
        flat = [str(k).replace("_", ".") for k in keys]
        return next((m for m in self.lora_marks if any(m in k for k in flat)), None)

    def load_single_file(self, path: Any, device: Any, dtype: Any) -> Any:
        """The family's pipeline from a single-file checkpoint (diffusers' ``from_single_file``) with the
        configuration (model_index.json, component configs, tokenizers) of ``hub_ids[0]`` from the local Hugging
        Face cache only; a ModelNotAvailableError naming the model and the `hf download` line of its configuration
        when it is not there. No safety checker (as ``load_pipeline``)."""
        import inspect

        import diffusers  # heavy: diffusers
        from persviz.hub_models import config_download_command  # heavy: huggingface_hub
        from persviz.loading import ModelNotAvailableError  # heavy: torch
        cls = getattr(diffusers, self.pipeline_class)
        config = self.hub_ids[0]
        extra = ({"safety_checker": None, "requires_safety_checker": False}
                 if "safety_checker" in inspect.signature(cls.__init__).parameters else {})
        try:
            pipe = cls.from_single_file(str(path), config=config, local_files_only=True, dtype=dtype, **extra)
        except (KeyError, ValueError, RuntimeError) as err:  # keys or shapes that do not make the family's model
            first = (str(err).splitlines() or [""])[0][:200]
            raise UnsupportedModelError(f"{path} holds {self.label} keys but is not a complete {self.label} "
                                        f"checkpoint ({type(err).__name__}: {first}); pass the model's full "
                                        "single-file checkpoint or its diffusers folder") from None
        except Exception as err:
            if type(err).__name__ != "SafetensorError" and not isinstance(err, OSError):
                raise
            if not isinstance(err, OSError):  # safetensors' own error: the tensors after the header are cut off
                raise UnsupportedModelError(f"{path} is a damaged or incomplete safetensors file ({err}); download "
                                            "it again") from None
            # the configuration is not in the cache (huggingface_hub's LocalEntryNotFoundError)
            raise ModelNotAvailableError(
                f"{path} is a {self.label} single-file checkpoint; loading it needs the configuration of {config} "
                f"(model_index.json, the component configs and tokenizers, a few MB: the weights come from the "
                f"file), which is not in the local Hugging Face cache; download it once where there is internet "
                f"(`{config_download_command(config)}`)") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def recipe_settings(self, method: Any, embedded: bool = False) -> dict[str, Any]:
        """The settings of `method`'s run config (a persviz.methods Method) on this family's models: ``recipes``,
        with ``embedded_recipes``' changes for an embedded model; an UnsupportedModelError naming the methods it
        has recipes for when it has none for `method`."""
        if method.name not in self.recipes:
            why = self.no_recipe.get(method.name, "")
            has = " or ".join(self.recipes)
            raise UnsupportedModelError(f"persviz has no {method.name} recipe for {self.label}"
                                        f"{' (' + why + ')' if why else ''}"
                                        f"{'; train ' + has + ' on it' if has else ''}")
        changes = self.embedded_recipes.get(method.name, {}) if embedded else {}
        return {**self.recipes[method.name], **changes}

    def pipeline_generation(self, pipe: Pipeline) -> dict[str, Any]:
        """steps, guidance and batch size of generation for this loaded pipeline (a family of several models with
        their own settings, Flux's dev and schnell, reads which one from the pipeline)."""
        return dict(self.generation)

    def pooled_encoder(self, stack: Any) -> str | None:
        """The name of the encoder whose pooled output ``prompt_states`` returns (SDXL: clip_g; Flux: clip_l), None
        where the family's denoiser reads no pooled embedding (SD 1.x)."""
        return None

    def state_encoders(self, stack: Any) -> tuple[str, ...]:
        """The names of the encoders whose hidden states, concatenated, are the pipeline's ``prompt_embeds`` (SD 1.x,
        SDXL: all; Flux: T5 alone, CLIP giving the pooled embedding)."""
        return tuple(e.name for e in stack)

    def generation_defaults(self, embedded: bool) -> dict[str, Any]:
        """steps, guidance and batch size of generation for an embedded model of the family or a full-scale one."""
        return dict(self.embedded_generation if embedded else self.generation)


__all__ = ["Family", "Pipeline", "UnsupportedModelError"]

"""The registry of model families (one module per family behind ``persviz.families.base.Family``) and the one
pipeline assembler every command and the notebooks' setup use.

    from persviz.families import assemble_pipeline, family_of
    pipe = assemble_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # loaded, checked, prepared
    family_of(pipe).text_stack(pipe).primary.tokenizer

Adding a family: one module here defining a ``Family`` subclass and its ``FAMILY`` object, one line in
``_MODULES``, and its tests (docs/contributing.md). Nothing outside this package compares a family's name.
"""
from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import Any

from persviz.constants import CPU_OFFLOAD_ENV
from persviz.families.base import Family, Pipeline, UnsupportedModelError

_MODULES = ("sd1",  # one line per family
            "sdxl",
            "flux")
FAMILIES: dict[str, Family] = {f.name: f for f in (import_module(f"persviz.families.{n}").FAMILY for n in _MODULES)}
DEFAULT_FAMILY: Family = FAMILIES["sd1"]  # the embedded micro-SD's family, and recipes' when a caller names none


def get_family(family: Family | str | None = None) -> Family:
    """A family object from itself or its name ('sd1', 'sdxl'); None: DEFAULT_FAMILY. An UnsupportedModelError
    listing the known names otherwise."""
    if family is None:
        return DEFAULT_FAMILY
    if isinstance(family, Family):
        return family
    if str(family) in FAMILIES:
        return FAMILIES[str(family)]
    raise UnsupportedModelError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def family_of(pipe: Pipeline, model: str | None = None) -> Family:
    """The family `pipe` belongs to; an UnsupportedModelError with the first family's sentence when none takes it."""
    name = str(model) if model is not None else type(pipe).__name__
    refusals = []
    for family in FAMILIES.values():
        why = family.refusal(pipe, name)
        if why is None:
            return family
        refusals.append(why)
    raise UnsupportedModelError(refusals[0])


def training_family(pipe: Pipeline, model: str | None = None, method: Any = None) -> Family:
    """family_of(pipe), refused with a sentence when persviz does not train on that family yet, or (method: a
    persviz.methods Method) does not train that method on it yet."""
    family = family_of(pipe, model)
    if family.trains and method is not None and family.trains_only and method.name not in family.trains_only:
        others = " or ".join(f.label for f in FAMILIES.values() if f.trains and method.name in f.recipes
                             and (not f.trains_only or method.name in f.trains_only))
        raise UnsupportedModelError(
            f"persviz trains {' and '.join(family.trains_only)} on {family.label} so far, not {method.name}; train "
            f"{method.name} on {others}, or {' / '.join(family.trains_only)} on {model or type(pipe).__name__}")
    if not family.trains:
        takes = " or ".join(f.label for f in FAMILIES.values() if f.trains)
        example = next(f.hub_ids[0] for f in FAMILIES.values() if f.trains and f.hub_ids)
        raise UnsupportedModelError(
            f"{model or type(pipe).__name__} is a {family.label} pipeline and persviz trains on {takes} only so far (runs to adopt and study too); "
            f"train on {example} (or a model fine-tuned from it), or inspect {family.label} embeddings with "
            "`persviz inspect FILE --model MODEL`")
    return family


CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")  # what a single-file model is named


def is_single_file(model: Any) -> bool:
    """Whether `model` names a file (a single-file checkpoint, or meant as one by its suffix), not a folder or id."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    path = Path(model).expanduser()
    return path.is_file() or (not path.exists() and path.suffix.lower() in CHECKPOINT_SUFFIXES)


def checkpoint_family(path: Any) -> Family:
    """The family of a single-file checkpoint (.safetensors), from its state-dict keys (SDXL's
    ``conditioner.embedders.1.``, SD 1.x's ``cond_stage_model.transformer.``: ``Family.checkpoint_prefix``), read
    from the file's header without loading a tensor; an UnsupportedModelError with one sentence for a missing file,
    a file that is not a safetensors checkpoint, or a checkpoint of no family persviz supports."""
    from persviz.embedding_files import sniff_container  # heavy: torch
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnsupportedModelError(f"no checkpoint file at {path}; pass the path of a .safetensors single-file "
                                    "checkpoint, a model folder or a Hub id")
    with open(path, "rb") as f:
        head = f.read(16)
    kind = sniff_container(head, path.stat().st_size)
    if kind in ("torch-zip", "torch-pickle"):
        raise UnsupportedModelError(f"{path} is a pickled torch checkpoint (.ckpt); persviz loads single-file "
                                    "checkpoints in the safetensors format only (a pickle can run code when read): "
                                    "use the model's .safetensors release")
    if kind is None and head[8:9] == b"{":
        raise UnsupportedModelError(f"{path} is a damaged or incomplete safetensors file (its header runs past its "
                                    "end); download it again")
    if kind != "safetensors":
        raise UnsupportedModelError(f"{path} is not a safetensors checkpoint (first bytes {head[:8]!r}); pass a "
                                    ".safetensors single-file checkpoint, a model folder or a Hub id")
    from safetensors import safe_open  # heavy: safetensors (torch)
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
        raise UnsupportedModelError(f"{path} is a damaged or incomplete safetensors file ({err}); download it "
                                    "again") from None
    for family in FAMILIES.values():
        if family.claims_checkpoint(keys):
            return family
    known = "; ".join(f"{f.label} ({f.checkpoint_prefix}...)" for f in FAMILIES.values() if f.checkpoint_prefix)
    raise UnsupportedModelError(f"{path} holds {len(keys)} tensors ({', '.join(sorted(keys)[:3])}, ...) but no keys "
                                f"of a model family persviz loads from one file: {known}; pass an SD 1.x or SDXL "
                                "checkpoint (an embedding or LoRA file goes to `persviz inspect` / `adopt`)")


def load_checkpoint(path: Any, device: str | None = None, dtype: Any = None) -> Any:
    """The pipeline of a single-file checkpoint: its family from its keys (``checkpoint_family``), loaded by the
    family (``Family.load_single_file``: the configuration from the local cache of its Hub id)."""
    from persviz.loading import pick_device  # heavy: torch
    family = checkpoint_family(path)
    dev, dt = pick_device(device, dtype)
    return family.load_single_file(Path(path).expanduser().resolve(), dev, dt)


def adopting_family(pipe: Pipeline, model: str | None = None, method: Any = None) -> Family:
    """training_family(pipe), refused with a sentence when `persviz adopt` does not take runs of that family yet, or
    (method: a persviz.methods Method) not that method's runs on it yet (``Family.adopts_only``: SDXL), or runs of a
    method the family has no recipe for (``Family.no_recipe``: FLUX.1's Textual Inversion)."""
    family = training_family(pipe, model)
    if family.adopts and method is not None and family.adopts_only and method.name not in family.adopts_only:
        others = " or ".join(f.label for f in FAMILIES.values() if f.adopts and method.name not in f.no_recipe
                             and (not f.adopts_only or method.name in f.adopts_only))
        raise UnsupportedModelError(
            f"persviz adopts {' and '.join(family.adopts_only)} runs on {family.label} so far, not {method.name}; "
            f"adopt a {method.name} run trained on {others}, or train {method.name} with persviz train where it "
            f"trains")
    if family.adopts and method is not None and method.name in family.no_recipe:
        raise UnsupportedModelError(f"persviz adopts {' and '.join(family.recipes)} runs trained on {family.label} so "
                                    f"far, not {method.name} ({family.no_recipe[method.name]})")
    if not family.adopts:
        takes = " or ".join(f.label for f in FAMILIES.values() if f.trains and f.adopts)
        raise UnsupportedModelError(f"{model or type(pipe).__name__} is a {family.label} pipeline and persviz adopts "
                                    f"runs trained on {takes} only so far; train the concept with persviz train "
                                    f"instead, or inspect the run's embeddings with `persviz inspect FILE --model "
                                    f"MODEL`")
    return family


def lora_family(keys: Any) -> tuple[Family, str] | None:
    """(the family whose LoRA files alone hold one of these keys' marks, the mark) or None (``Family.claims_lora``:
    SDXL's second text encoder or its UNet's second transformer block, SD 1.x's attention in the first down block)."""
    for family in FAMILIES.values():
        mark = family.claims_lora(keys)
        if mark is not None:
            return family, mark
    return None


def lora_refusal(keys: Any, pipe: Pipeline, what: str, model: str | None = None) -> str | None:
    """None when a LoRA file with these keys may be of `pipe`'s family; else one sentence naming both families
    (what: the file, for the sentence; model: the model's name, default the pipeline's ``_name_or_path``)."""
    model = model or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    found = lora_family(keys)
    family = family_of(pipe, model)
    if found is None or found[0] is family:
        return None
    other, mark = found
    return (f"{what} is a {other.label} LoRA (its keys hold {mark.replace('.', '_').strip('_')}) but "
            f"{model or type(pipe).__name__} is a {family.label} pipeline: the LoRA was trained on another model "
            f"family; pass a {family.label} LoRA, or the {other.label} model it was trained on with --model")


def is_pipeline(obj: Any) -> bool:
    """Whether obj is a diffusion pipeline of some family (a denoiser: a UNet or, Flux, a transformer), not a
    (tokenizer, text_encoder) pair or a lone component."""
    return not isinstance(obj, (tuple, list)) and (hasattr(obj, "unet") or hasattr(obj, "transformer"))


def text_stack(pipe: Pipeline) -> Any:
    """The text encoders of a diffusion pipeline (persviz.text_stack.TextStack), as its family lays them out."""
    return family_of(pipe).text_stack(pipe)


def index_family(model: Any) -> Family | None:
    """The family whose ``pipeline_class`` a model's ``model_index.json`` names (a Hub id in the local cache or a
    folder), read before loading it; None when there is none to read or no family claims it."""
    if not isinstance(model, (str, os.PathLike)) or is_single_file(model):
        return None
    from diffusers import DiffusionPipeline  # heavy: diffusers
    try:
        index = DiffusionPipeline.load_config(str(model))
    except (OSError, ValueError):
        return None  # not there: the loader says so with its sentence
    return next((f for f in FAMILIES.values() if f.pipeline_class and f.pipeline_class == index.get("_class_name")),
                None)


def wants_cpu_offload(cpu_offload: bool | None) -> bool:
    """cpu_offload, else the command line's ``--cpu-offload`` (PERSVIZ_CPU_OFFLOAD=1)."""
    if cpu_offload is not None:
        return bool(cpu_offload)
    return os.environ.get(CPU_OFFLOAD_ENV, "").strip() not in ("", "0")


def assemble_pipeline(model: Any = None, device: str | None = None, dtype: Any = None,
                      cpu_offload: bool | None = None) -> Any:
    """The pipeline of `model` ('shapesworld' or None: the embedded micro-SD; a Hub id, a folder, or a loaded
    pipeline, or a single-file .safetensors checkpoint), loaded (persviz.loading.load_pipeline; a file:
    ``load_checkpoint``), checked against the families and prepared for persviz's studies by its family (at full
    scale the paper's sampler). The notebooks' setup and every command use it.

    On a GPU without a dtype the family's (``Family.gpu_dtype``: float16, Flux bfloat16). cpu_offload (None: the
    command line's ``--cpu-offload``): diffusers' ``enable_model_cpu_offload``, each model moved to the GPU while it
    runs, for cards with less memory than the pipeline needs (FLUX.1 in bf16 needs about 34 GB); it needs a CUDA
    GPU and is refused with a sentence without one."""
    import torch  # heavy: torch
    from persviz.loading import is_embedded, load_pipeline  # heavy: diffusers (the loader)
    offload = wants_cpu_offload(cpu_offload)
    if offload and not torch.cuda.is_available():
        raise UnsupportedModelError("--cpu-offload moves each model of the pipeline to a CUDA GPU while it runs, and "
                                    "this machine has none; leave --cpu-offload out (the pipeline runs on the CPU)")
    on_gpu = offload or (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
    family = index_family(model) if dtype is None and on_gpu and not is_embedded(model) else None
    if family is not None:  # read from model_index.json before loading (the local cache or folder, as the loader)
        dtype = getattr(torch, family.gpu_dtype)
    if is_single_file(model):
        pipe = load_checkpoint(model, device=device, dtype=dtype)
        return family_of(pipe, str(model)).prepare(pipe, embedded=False)
    pipe = load_pipeline(model, device="cpu" if offload else device, dtype=dtype)
    family = family_of(pipe, None if model is None else str(model) if isinstance(model, (str, os.PathLike)) else None)
    if not isinstance(model, (str, os.PathLike)) and model is not None:
        return pipe  # a pipeline the caller already loaded and set up: checked, left as it is
    pipe = family.prepare(pipe, embedded=is_embedded(model))
    if offload:
        pipe.enable_model_cpu_offload(device=device or "cuda")
    return pipe


__all__ = ["CHECKPOINT_SUFFIXES", "DEFAULT_FAMILY", "FAMILIES", "Family", "UnsupportedModelError",
           "assemble_pipeline", "checkpoint_family", "family_of", "get_family", "is_single_file", "load_checkpoint",
           "text_stack", "training_family", "adopting_family", "index_family", "is_pipeline", "lora_family",
           "lora_refusal", "wants_cpu_offload"]

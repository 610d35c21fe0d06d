"""Adopting another tool's run, the pieces the method modules share: ``ForeignRun`` (a run as found), the reading of
persviz's own run config, the sentences, and the detection and width check of LoRA runs (DreamBooth-LoRA and the
LoRA fine-tune share one implementation: their run files are the same kind).

Each method answers ``Method.detect_run(path, token)`` and ``Method.check_run_fits(found, pipe, class_word)``
(persviz.methods.base); ``persviz.foreign_runs`` asks the registry and writes the concept folder. This module is not
a method (it is not in the registry's ``_MODULES``); it imports no heavy library at its top.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.errors import ConceptFolderError
from persviz.families import lora_refusal, text_stack
from persviz.tokens import DREAMBOOTH_IDENTIFIER

_KOHYA_DIR = re.compile(r"\d+_(\S+)(?:\s+(\S+))?")  # kohya's dataset folders: "<repeats>_<token> <class>"
_DOWN = ("lora_A.", "lora.down.", "lora_down.", "_lora.down.", "lora_linear_layer.down.")


@dataclass(frozen=True)
class ForeignRun:
    """A run folder as found: the method, its absolute path, the source format, the token and (if recorded) the
    class word, and the files read."""

    method: str
    path: Path
    source: str
    token: str
    class_word: str | None
    files: tuple[Path, ...]


def persviz_config(folder: Path) -> dict:
    """The config.json persviz's trainers write into a run folder ({} when absent or not persviz's)."""
    from persviz.trainers.core import CONFIG_FILE  # heavy: the trainers
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        return {}
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) and "format" in d else {}


def not_found(method: Any, path: Path, why: str = "") -> ConceptFolderError:
    """'PATH is not a <method> run folder persviz recognises: WHY; looked for ...' (method: a Method object)."""
    return ConceptFolderError(f"{path} is not a {method.name} run folder persviz recognises{': ' + why if why else ''}; "
                              f"looked for {method.looked_for}")


def asked_token(token: str | None, stored: str, path: Path, fmt: str = "") -> str:
    """The stored token, or a sentence when --token names another."""
    if token is not None and token != stored:
        why = ""
        if fmt.startswith("a1111") and token.strip("<>") == stored:
            why = (f" (A1111 names an embedding after its file and its users write it in prompts as {stored}, "
                   f"without brackets)")
        raise ConceptFolderError(f"the embedding in {path} is stored under {stored!r}, not {token!r}{why}; drop "
                                 f"--token or pass --token '{stored}'")
    return stored


def another_model(what: str, width: int, need: int) -> ConceptFolderError:
    return ConceptFolderError(f"{what} is {width} wide but the model's is {need}: the run was trained on another "
                              "model; pass the model it was trained on with --model")


def kohya_names(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    """(token, class word) from kohya's metadata: its dataset folders are named "<repeats>_<token> <class>"."""
    for key in ("ss_dataset_dirs", "ss_tag_frequency"):
        try:
            dirs = json.loads(metadata.get(key, "{}"))
        except json.JSONDecodeError:
            continue
        for name in dirs if isinstance(dirs, dict) else []:
            m = _KOHYA_DIR.fullmatch(str(name).strip())
            if m:
                return m.group(1), m.group(2)
    return None, None


# ----------------------------------------------------------------------------- LoRA runs (both LoRA methods)


def detect_lora_run(method: Any, path: Path, token: str | None) -> ForeignRun:
    """A LoRA run of `method` (a Method object): persviz's or diffusers' pytorch_lora_weights, or a kohya / A1111
    LoRA file; token and class word from persviz's config, else kohya's metadata, else 'sks'."""
    from persviz.trainers.dreambooth_lora import find_lora_file  # heavy: the trainers
    from persviz.weight_files import lora_layout, read_weights  # heavy: torch
    try:
        f = find_lora_file(path)
        sd, _, meta = read_weights(f)
    except (FileNotFoundError, ValueError) as err:
        raise not_found(method, path, str(err)) from None
    layout = lora_layout(sd)
    if layout is None:
        raise not_found(method, path, f"{f.name} has keys {sorted(sd)[:3]}, not a LoRA's")
    folder = path if path.is_dir() else path.parent
    cfg = persviz_config(folder)
    k_token, k_class = kohya_names(meta) if layout in ("kohya", "kohya-flux") else (None, None)
    source = "persviz" if cfg.get("identifier") else layout
    found = token or cfg.get("identifier") or k_token or DREAMBOOTH_IDENTIFIER
    return ForeignRun(method.name, path, source, found, cfg.get("class_word") or k_class, (f,))


def lora_in_widths(sd: dict[str, Any]) -> tuple[dict[int, set[int]], set[int]]:
    """({text encoder index: in-widths of its attention LoRAs}, in-widths of the UNet's cross-attention K/V LoRAs);
    index 1 is SDXL's second encoder (diffusers' ``text_encoder_2.``, kohya's ``lora_te2_``), 0 the first (or only)."""
    text: dict[int, set[int]] = {}
    cross = set()
    for k, v in sd.items():
        if not any(d in k for d in _DOWN) or getattr(v, "ndim", 0) != 2:
            continue
        flat = k.replace("_", ".")
        if "self.attn" in flat and any(f"{p}.proj" in flat for p in ("q", "k", "v", "out")):
            text.setdefault(int(flat.startswith(("text.encoder.2.", "lora.te2."))), set()).add(int(v.shape[1]))
        elif "attn2" in flat and ("to.k" in flat or "to.v" in flat):
            cross.add(int(v.shape[1]))
    return text, cross


def check_lora_fits(found: ForeignRun, pipe: Any) -> None:
    """The LoRA's model family (``persviz.families.lora_refusal``: a sentence naming both), then, on a UNet, its input
    widths against each text encoder's (by its index in the pipeline's text stack) and the UNet's cross-attention;
    on FLUX.1's transformer by loading it and unloading it (diffusers converts kohya's names and checks every
    shape)."""
    from persviz.weight_files import lora_layout, read_weights  # heavy: torch
    f = found.files[0]
    sd, _, _ = read_weights(f)
    why = lora_refusal(sd, pipe, str(f))
    if why is not None:
        raise ConceptFolderError(why)
    transformer = getattr(pipe, "transformer", None) is not None
    flux_lora = lora_layout(sd) in ("diffusers-flux", "kohya-flux")
    if flux_lora != transformer:  # a LoRA of one denoiser against the other, no family mark to tell it by
        raise ConceptFolderError(f"{f.name} is {'a FLUX.1 (transformer)' if flux_lora else 'a UNet (SD 1.x)'} LoRA "
                                 f"and the model is {'a FLUX.1' if transformer else 'a UNet'} pipeline: it was "
                                 "trained on another model; pass the model it was trained on")
    if transformer:
        try:
            pipe.load_lora_weights(dict(sd), adapter_name="persviz_check")
        except (ValueError, RuntimeError, KeyError) as err:
            first = (str(err).splitlines() or [""])[0][:160]
            raise ConceptFolderError(f"{f.name} does not fit the model's FLUX.1 transformer ({type(err).__name__}: "
                                     f"{first}): it was trained on another model; pass that model") from None
        pipe.delete_adapters("persviz_check")
        return
    cross_dim = int(pipe.unet.config.cross_attention_dim)
    stack = text_stack(pipe)
    text, cross = lora_in_widths(sd)
    for i, widths in sorted(text.items()):
        if i >= len(stack):
            raise ConceptFolderError(f"{f.name} holds a LoRA for text encoder {i + 1} but the model has "
                                     f"{len(stack)}: the run was trained on another model; pass the model it was "
                                     "trained on with --model")
        for w in sorted(widths - {stack.encoders[i].width}):
            raise another_model(f"the {stack.encoders[i].name} text encoder's LoRA in {f.name}", w,
                                stack.encoders[i].width)
    for w in sorted(cross - {cross_dim}):
        raise another_model(f"the cross-attention LoRA in {f.name}", w, cross_dim)


__all__ = ["ForeignRun", "another_model", "asked_token", "check_lora_fits", "detect_lora_run",
           "kohya_names", "lora_in_widths", "not_found", "persviz_config"]

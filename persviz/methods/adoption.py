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
    if layout == "kohya-sdxl":
        raise ConceptFolderError(f"{f} is an SDXL LoRA (lora_te1_/lora_te2_ keys): it was trained on another model; "
                                 "persviz supports SD 1.x LoRAs")
    if layout is None:
        raise not_found(method, path, f"{f.name} has keys {sorted(sd)[:3]}, not a LoRA's")
    folder = path if path.is_dir() else path.parent
    cfg = persviz_config(folder)
    k_token, k_class = kohya_names(meta) if layout in ("kohya", "kohya-flux") else (None, None)
    source = "persviz" if cfg.get("identifier") else layout
    found = token or cfg.get("identifier") or k_token or DREAMBOOTH_IDENTIFIER
    return ForeignRun(method.name, path, source, found, cfg.get("class_word") or k_class, (f,))


def lora_in_widths(sd: dict[str, Any]) -> tuple[set[int], set[int]]:
    """(in-widths of the text encoder's attention LoRAs, in-widths of the UNet's cross-attention K/V LoRAs)."""
    text, cross = set(), set()
    for k, v in sd.items():
        if not any(d in k for d in _DOWN) or getattr(v, "ndim", 0) != 2:
            continue
        flat = k.replace("_", ".")
        if "self.attn" in flat and any(f"{p}.proj" in flat for p in ("q", "k", "v", "out")):
            text.add(int(v.shape[1]))
        elif "attn2" in flat and ("to.k" in flat or "to.v" in flat):
            cross.add(int(v.shape[1]))
    return text, cross


def check_lora_fits(found: ForeignRun, pipe: Any, width: int) -> None:
    """The LoRA's input widths against the text encoder's (`width`) and the UNet's cross-attention; a FLUX.1 LoRA
    (diffusers' or kohya's) against a FLUX.1 transformer by loading it and unloading it (diffusers converts kohya's
    names and checks every shape), and a LoRA of one denoiser against a model of the other refused."""
    from persviz.weight_files import lora_layout, read_weights  # heavy: torch
    sd, _, _ = read_weights(found.files[0])
    flux_lora = lora_layout(sd) in ("diffusers-flux", "kohya-flux")
    transformer = getattr(pipe, "transformer", None) is not None
    name = found.files[0].name
    if flux_lora != transformer:
        raise ConceptFolderError(f"{name} is {'a FLUX.1 (transformer)' if flux_lora else 'a UNet (SD 1.x)'} LoRA and "
                                 f"the model is {'a FLUX.1' if transformer else 'a UNet'} pipeline: it was trained on "
                                 "another model; pass the model it was trained on")
    if transformer:
        try:
            pipe.load_lora_weights(dict(sd), adapter_name="persviz_check")
        except (ValueError, RuntimeError, KeyError) as err:
            first = (str(err).splitlines() or [""])[0][:160]
            raise ConceptFolderError(f"{name} does not fit the model's FLUX.1 transformer ({type(err).__name__}: "
                                     f"{first}): it was trained on another model; pass that model") from None
        pipe.delete_adapters("persviz_check")
        return
    cross_dim = int(pipe.unet.config.cross_attention_dim)
    text, cross = lora_in_widths(sd)
    for w in sorted(text - {width}):
        raise another_model(f"the text encoder's LoRA in {found.files[0].name}", w, width)
    for w in sorted(cross - {cross_dim}):
        raise another_model(f"the cross-attention LoRA in {found.files[0].name}", w, cross_dim)


__all__ = ["ForeignRun", "another_model", "asked_token", "check_lora_fits", "detect_lora_run",
           "kohya_names", "lora_in_widths", "not_found", "persviz_config"]

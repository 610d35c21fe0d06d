"""Run folders of other tools, read as they are, and brought into a concept folder: what ``persviz adopt`` does.

    persviz adopt ti ~/sd-scripts-out/cat_toy --out my_cat/ --images photos/ --class-word toy

Formats, recognised from the files' content (safetensors or torch, and their keys; never the suffix):

=====================  ===========================================================================================
method / source        what the run folder holds (how persviz loads it)
=====================  ===========================================================================================
textual_inversion
  ``diffusers``        diffusers' ``examples/textual_inversion/textual_inversion.py``: ``learned_embeds-steps-N``
                       snapshots (.safetensors, .bin) and ``learned_embeds.safetensors``; token: the file's key
  ``a1111``            Automatic1111's ``textual_inversion/<date>/<name>/embeddings/<name>-N.pt`` (the ``<name>``
                       folder or its ``embeddings/``), else its ``image_embeddings/<name>-N.png`` (image
                       embeddings); token: the files' ``name`` (no brackets: A1111 names an embedding after its
                       file); final: ``<name>.pt`` if beside them, else the last snapshot
  ``kohya``            kohya's sd-scripts ``train_textual_inversion.py``: ``<name>-stepNNNNNNNN.safetensors`` / ``.pt``
                       snapshots and the final ``<name>.safetensors``; token: ``modelspec.title`` or ``<name>``
  ``textual-inversion``  the original Textual Inversion: ``checkpoints/embeddings_gs-N.pt`` and ``embeddings.pt``
                       (token "*", the string_to_param key; pass --token only to confirm it)
  (both)               the tracker reads the snapshots (``trainers.list_snapshots`` / ``load_snapshot_embedding``),
                       ``personalized`` the final (``trainers.load_textual_inversion_run``)
dreambooth
  ``diffusers``        ``examples/dreambooth/train_dreambooth_lora.py``: ``pytorch_lora_weights.safetensors``
                       (``unet.*.lora_A.weight``, ``text_encoder.*``); token "sks" unless given
  ``kohya``            kohya's sd-scripts / A1111 LoRA files of any name (``lora_unet_*.lora_down.weight``,
                       ``.lora_up.weight``, ``.alpha``, ``lora_te_*``); token and class word from the training
                       folder name in its metadata (``ss_dataset_dirs``: "10_sks dog"), else "sks"
  (both)               ``trainers.load_dreambooth_lora``: ``pipe.load_lora_weights`` (converts kohya's keys)
custom_diffusion
  ``diffusers``        ``examples/custom_diffusion/train_custom_diffusion.py``:
                       ``pytorch_custom_diffusion_weights.safetensors`` or ``.bin`` (``unet.save_attn_procs``) and
                       ``<new1>.bin`` (safetensors bytes, ``save_new_embed``); token: the ``<token>.bin`` key
  (both)               ``trainers.load_custom_diffusion``
=====================  ===========================================================================================

``persviz`` is the source of persviz's own runs (their config.json). Every check runs before anything is written:
the format, the token, the class word, the widths against the model (``embedding_files.check_fits``: "trained on
another model"). The run folder is not copied: concept.json records its absolute path and the source found.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.families.base import Pipeline
from persviz.concept_folder import (CONCEPT_FILE, Concept, ConceptFolderError, adopt_images, check_method,
                                    prepare_concept, read_concept, write_concept)
from persviz.embedding_files import EmbeddingFileError, check_fits, embedding_candidates, read_embedding_file
from persviz.io import PathLike, confined
from persviz.families import assemble_pipeline, training_family
from persviz.methods import get_method
from persviz.families import text_stack
from persviz.trainers.concept_runs import model_id
from persviz.trainers.core import CONFIG_FILE
from persviz.trainers.custom_diffusion import (KEY_MARK, custom_diffusion_embeddings, custom_diffusion_weights,
                                               read_custom_diffusion_weights)
from persviz.trainers.dreambooth_lora import find_lora_file
from persviz.tokens import DREAMBOOTH_IDENTIFIER
from persviz.trainers.textual_inversion import final_embedding, list_snapshots, run_token
from persviz.weight_files import lora_layout, read_weights

LOOKED_FOR = {
    "textual_inversion": "learned_embeds-steps-<k>.safetensors / .bin snapshots (persviz, diffusers' "
                         "textual_inversion.py), kohya's <name>-step<k:08d>.safetensors, the original Textual "
                         "Inversion's checkpoints/embeddings_gs-<k>.pt or Automatic1111's embeddings/<name>-<k>.pt "
                         "or image_embeddings/<name>-<k>.png",
    "dreambooth": "pytorch_lora_weights.safetensors / .bin (persviz, diffusers' train_dreambooth_lora.py) or a LoRA "
                  "file in kohya's / A1111's layout (lora_unet_*.lora_down.weight)",
    "custom_diffusion": "pytorch_custom_diffusion_weights.safetensors / .bin (persviz, diffusers' "
                        "train_custom_diffusion.py) with learned_embeds.safetensors or <token>.bin",
}
_KOHYA_DIR = re.compile(r"\d+_(\S+)(?:\s+(\S+))?")  # kohya's dataset folders: "<repeats>_<token> <class>"


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


def _persviz_config(folder: Path) -> dict:
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        return {}
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) and "format" in d else {}


def _not_found(method: str, path: Path, why: str = "") -> ConceptFolderError:
    return ConceptFolderError(f"{path} is not a {method} run folder persviz recognises{': ' + why if why else ''}; "
                              f"looked for {LOOKED_FOR[method]}")


def _asked_token(token: str | None, stored: str, path: Path, fmt: str = "") -> str:
    if token is not None and token != stored:
        why = ""
        if fmt.startswith("a1111") and token.strip("<>") == stored:
            why = (f" (A1111 names an embedding after its file and its users write it in prompts as {stored}, "
                   f"without brackets)")
        raise ConceptFolderError(f"the embedding in {path} is stored under {stored!r}, not {token!r}{why}; drop "
                                 f"--token or pass --token '{stored}'")
    return stored


SOURCES = {"a1111": "a1111", "a1111-image": "a1111", "kohya": "kohya", "textual-inversion": "textual-inversion"}


def _no_snapshots(path: Path) -> ConceptFolderError:
    """What a folder without one run's numbered snapshots holds instead, in one sentence."""
    try:
        found = embedding_candidates(path)
    except OSError:
        found = []
    if not found:
        return _not_found("textual_inversion", path, "no snapshots")
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    return _not_found("textual_inversion", path, f"it holds {len(found)} embedding file(s) ({names}) but no numbered "
                      "snapshots of one training run (an embeddings folder, not a run; `persviz inspect` the folder "
                      "to see each)")


def _textual_inversion(path: Path, token: str | None) -> ForeignRun:
    if not path.is_dir():
        raise _not_found("textual_inversion", path, "pass the run's folder (the tracker reads its snapshots)")
    try:
        snaps = list_snapshots(path)
    except ValueError as err:
        raise _not_found("textual_inversion", path, str(err)) from None
    if not snaps:
        raise _no_snapshots(path)
    files = [snaps[0][1], snaps[-1][1], final_embedding(path)]
    read = [read_embedding_file(f) for f in files]  # EmbeddingFileError (a ValueError) names the file and the fix
    if any(f.per_encoder for f in read):
        check_fits(next(f for f in read if f.per_encoder), 768)  # raises: SDXL
    names = {run_token(f) for f in read}
    if len(names) > 1:
        raise ConceptFolderError(f"{path} holds embeddings of several tokens ({', '.join(sorted(names))}); pass the "
                                 "folder of one run")
    cfg = _persviz_config(path)
    fmt = read[-1].format
    source = "persviz" if cfg.get("placeholder") else SOURCES.get(fmt, "diffusers")
    return ForeignRun("textual_inversion", path, source, _asked_token(token, run_token(read[-1]), files[-1], fmt),
                      cfg.get("initializer"), tuple(dict.fromkeys(files)))


def _kohya_names(metadata: dict[str, str]) -> tuple[str | None, str | None]:
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


def _dreambooth(path: Path, token: str | None) -> ForeignRun:
    try:
        f = find_lora_file(path)
        sd, _, meta = read_weights(f)
    except (FileNotFoundError, ValueError) as err:
        raise _not_found("dreambooth", path, str(err)) from None
    layout = lora_layout(sd)
    if layout == "kohya-sdxl":
        raise ConceptFolderError(f"{f} is an SDXL LoRA (lora_te1_/lora_te2_ keys): it was trained on another model; "
                                 "persviz supports SD 1.x LoRAs")
    if layout is None:
        raise _not_found("dreambooth", path, f"{f.name} has keys {sorted(sd)[:3]}, not a LoRA's")
    folder = path if path.is_dir() else path.parent
    cfg = _persviz_config(folder)
    k_token, k_class = _kohya_names(meta) if layout == "kohya" else (None, None)
    source = "persviz" if cfg.get("identifier") else layout
    found = token or cfg.get("identifier") or k_token or DREAMBOOTH_IDENTIFIER
    return ForeignRun("dreambooth", path, source, found, cfg.get("class_word") or k_class, (f,))


def _custom_diffusion(path: Path, token: str | None) -> ForeignRun:
    try:
        weights = custom_diffusion_weights(path)
        sd = read_custom_diffusion_weights(weights)
    except (FileNotFoundError, ValueError) as err:
        raise _not_found("custom_diffusion", path, str(err)) from None
    if not sd or not all(KEY_MARK in k for k in sd):
        raise _not_found("custom_diffusion", path, f"{weights.name} has keys {sorted(sd)[:3]}")
    embeds = custom_diffusion_embeddings(weights.parent)
    tokens = {read_embedding_file(e).token: e for e in embeds}
    if token is None:
        if not tokens:
            raise ConceptFolderError(f"found no modifier token in {weights.parent} (no learned_embeds.safetensors or "
                                     "<token>.bin embedding); pass --token with the token the run was trained with")
        if len(tokens) > 1:
            raise ConceptFolderError(f"{weights.parent} holds several modifier tokens ({', '.join(sorted(tokens))}); "
                                     "pass --token with the concept's")
        token = next(iter(tokens))
    elif tokens and token not in tokens:
        raise ConceptFolderError(f"{weights.parent} holds the modifier token(s) {', '.join(sorted(tokens))}, not "
                                 f"{token!r}; pass one of them with --token")
    cfg = _persviz_config(weights.parent)
    source = "persviz" if cfg.get("modifier_token") else "diffusers"
    return ForeignRun("custom_diffusion", path, source, token, cfg.get("class_word"), (weights, *embeds))


def detect_run(method: str, run: PathLike, token: str | None = None) -> ForeignRun:
    """The run at `run` as found (see the module docstring); a ConceptFolderError (a ValueError) saying what was
    looked for, or asking for --token, otherwise. `token` replaces what is found where the format allows."""
    method = check_method(method)
    path = Path(run).expanduser().resolve()
    if not path.exists():
        raise ConceptFolderError(f"no run at {path}; pass the folder the other tool wrote")
    return {"token_rows": _textual_inversion, "lora": _dreambooth,
            "attention_kv": _custom_diffusion}[get_method(method).weights](path, token)


# ----------------------------------------------------------------------------- against the model


_DOWN = ("lora_A.", "lora.down.", "lora_down.", "_lora.down.", "lora_linear_layer.down.")


def _lora_in_widths(sd: dict[str, Any]) -> tuple[set[int], set[int]]:
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


def _another_model(what: str, width: int, need: int) -> ConceptFolderError:
    return ConceptFolderError(f"{what} is {width} wide but the model's is {need}: the run was trained on another "
                              "model; pass the model it was trained on with --model")


def check_run_fits(found: ForeignRun, pipe: Pipeline, class_word: str) -> None:
    """Errors before anything is written: the token and class word against the tokenizer, every width against the
    model (embeddings: ``check_fits``; LoRA and Custom Diffusion weights: their input widths and layer names)."""
    text = text_stack(pipe).primary
    width = text.width
    cross_dim = int(pipe.unet.config.cross_attention_dim)
    weights_kind = get_method(found.method).weights
    if weights_kind == "token_rows":
        for f in found.files:
            check_fits(read_embedding_file(f), text.encoder)
    elif weights_kind == "attention_kv":
        weights, *embeds = found.files
        for e in embeds:
            check_fits(read_embedding_file(e), text.encoder)
        procs = pipe.unet.attn_processors
        for key, v in read_custom_diffusion_weights(weights).items():
            layer, _, sub = key.partition(".processor.")
            if layer + ".processor" not in procs:
                raise ConceptFolderError(f"{weights.name} holds weights of a layer {layer!r} the model's UNet does not "
                                         "have: the run was trained on another model; pass it with --model")
            if not sub.endswith("weight"):
                continue
            base = pipe.unet.get_submodule(layer)
            proj = sub.split(".")[0].replace("_custom_diffusion", "")
            target = base.to_out[0] if proj == "to_out" else getattr(base, proj, None)
            if target is not None and tuple(v.shape) != tuple(target.weight.shape):
                raise _another_model(f"{key} of shape {tuple(v.shape)}", int(v.shape[-1]),
                                     int(target.weight.shape[-1]))
    else:
        sd, _, _ = read_weights(found.files[0])
        text, cross = _lora_in_widths(sd)
        for w in sorted(text - {width}):
            raise _another_model(f"the text encoder's LoRA in {found.files[0].name}", w, width)
        for w in sorted(cross - {cross_dim}):
            raise _another_model(f"the cross-attention LoRA in {found.files[0].name}", w, cross_dim)
    try:
        get_method(found.method).check_tokens(text.tokenizer, found.token, class_word)
    except ValueError as err:
        raise ConceptFolderError(f"{err} (pass the run's own with --token / --class-word)") from None


# ----------------------------------------------------------------------------- adopting


def adopt_run(method: str, run: PathLike, out: PathLike, images: PathLike, class_word: str | None = None,
              token: str | None = None, model: str | PathLike | None = None, pipe: Pipeline = None) -> Concept:
    """Register the run folder of another tool (or of persviz) as `method`'s run of the concept folder `out`,
    created as ``persviz train`` does (images copied in, concept.json written atomically) or extended; returns the
    concept. The run is not copied: its absolute path and source are recorded. Every check runs first.

    class_word: the concept's class (default: what the run or an existing concept folder records; else an error
    asking for --class-word). token: the run's token where it cannot be read from the files (DreamBooth: 'sks').
    model: the model the run was trained on (default ShapesWorld's micro-SD); pipe: that model, already loaded."""
    method = check_method(method)
    found = detect_run(method, run, token)
    folder = Path(out).expanduser().resolve()
    existing = read_concept(folder) if (folder / CONCEPT_FILE).is_file() else None
    class_word = class_word or found.class_word or (existing.class_word if existing else None)
    if not class_word:
        raise ConceptFolderError(f"the {method} run in {found.path} does not record the concept's class word; pass "
                                 "--class-word (one token, e.g. dog)")
    mid = model_id(model)
    if existing is not None:
        placeholder = existing.placeholder
    else:
        placeholder = get_method(method).concept_placeholder(found.token)
    concept = prepare_concept(folder, images, placeholder, class_word, mid)
    known = concept.runs.get(method)
    if known and Path(concept.folder, known["folder"]).resolve() != found.path:
        raise ConceptFolderError(f"the concept in {folder} already has a {method} run ({known['folder']}); adopt "
                                 "the run into another --out folder")
    if pipe is None:
        pipe = assemble_pipeline(mid)
    training_family(pipe, mid)
    try:
        check_run_fits(found, pipe, class_word)
    except EmbeddingFileError as err:
        raise ConceptFolderError(str(err)) from None
    with confined(concept.folder):  # the run itself is only read: persviz writes into the concept folder alone
        adopt_images(concept, images)
        concept.runs[method] = {"folder": str(found.path), "token": found.token, "source": found.source}
        write_concept(concept)
    return concept


__all__ = ["LOOKED_FOR", "ForeignRun", "adopt_run", "check_run_fits", "detect_run"]

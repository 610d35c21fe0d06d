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

Each method reads its own runs (``Method.detect_run``, ``Method.check_run_fits`` in its module of
``persviz.methods``; the LoRA methods share ``persviz.methods.adoption``); this module asks the registry and writes
the concept folder.
"""
from __future__ import annotations

from pathlib import Path

from persviz.families.base import Pipeline
from persviz.concept_folder import (CONCEPT_FILE, Concept, ConceptFolderError, adopt_images, check_method,
                                    prepare_concept, read_concept, write_concept)
from persviz.embedding_files import EmbeddingFileError
from persviz.io import PathLike, confined
from persviz.families import adopting_family, assemble_pipeline
from persviz.methods import METHODS, get_method
from persviz.methods.adoption import ForeignRun
from persviz.trainers.concept_runs import model_id

# What each concept method's detection looks for (the methods' own ``looked_for``; their sentences name it).
LOOKED_FOR = {name: get_method(name).looked_for for name in METHODS}


def detect_run(method: str, run: PathLike, token: str | None = None) -> ForeignRun:
    """The run at `run` as found (see the module docstring); a ConceptFolderError (a ValueError) saying what was
    looked for, or asking for --token, otherwise. `token` replaces what is found where the format allows. Each
    method detects its own runs (``Method.detect_run``, persviz.methods)."""
    m = get_method(check_method(method))
    path = Path(run).expanduser().resolve()
    if not path.exists():
        raise ConceptFolderError(f"no run at {path}; pass the folder the other tool wrote")
    return m.detect_run(path, token)


def check_run_fits(found: ForeignRun, pipe: Pipeline, class_word: str) -> None:
    """Errors before anything is written: the token and class word against the tokenizer, every width against the
    model (embeddings: ``check_fits``; LoRA and Custom Diffusion weights: their input widths and layer names); each
    method checks its own runs (``Method.check_run_fits``, persviz.methods)."""
    get_method(found.method, concept_only=False).check_run_fits(found, pipe, class_word)


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
    adopting_family(pipe, mid, get_method(method))
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

"""FineXL at full scale: which LoRA it explains, against which base, with which probe prompts.

At full scale FineXL compares SD 1.5 with and without one LoRA: a concept's DreamBooth-LoRA (the ``dreambooth``
run of a concept folder made by ``persviz train dreambooth``), or any diffusers LoRA file or folder::

    target = lora_target("/path/to/my_dog")                    # a concept folder: its DreamBooth-LoRA, class word
    target = lora_target("/loras/pytorch_lora_weights.safetensors", class_word="cat")
    base, personal = concept_lora_pair(pipe, target, steps=50, guidance=7.0)
    probes = class_probes(target.class_word, 24)               # SD 1.5 contextual prompts with the class word

In a notebook `session_target(sess)` picks the target from the session's settings: ``PERSVIZ_FINEXL_LORA`` when set,
else the first concept of ``PERSVIZ_CONCEPT``; with neither a `FineXLTargetError` says how to make or name one
(never a silent fall back to ShapesWorld). `full_scale_inputs(sess)` adds the probes (``PERSVIZ_PROBES``, default 24)
and the generation settings (``sess.generation()``: 50 steps, guidance 7, batches of 8 unless ``PERSVIZ_STEPS``,
``PERSVIZ_GUIDANCE``, ``PERSVIZ_BATCH_SIZE`` say otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from persviz.families.base import Pipeline
from persviz.concept_folder import CONCEPT_FILE, Concept, ConceptFolderError, read_concept
from persviz.finexl.concepts import ART_BANK
from persviz.finexl.generators import LoRAToggleGenerator, lora_pair
from persviz.prompts import fill, load_prompt_set
from persviz.trainers.lora_finetune import LORA_FILE

METHOD = "dreambooth"            # the concept-folder run FineXL explains
PROBE_SET = "sd15_contextual"    # the SD 1.5 contextual prompts, '{}' where the class word goes
N_PROBES = 24                    # the paper uses about 20-25 probe prompts
DEFAULT_CLASS_WORD = "dog"       # a bare LoRA's probes without PERSVIZ_FINEXL_CLASS
NEEDS_LORA = ("PERSVIZ_SCALE=full: FineXL explains a LoRA against SD 1.5 and needs one: PERSVIZ_CONCEPT=<concept "
              "folder> with a DreamBooth-LoRA run, made with `persviz train dreambooth --model "
              "stable-diffusion-v1-5/stable-diffusion-v1-5 --images DIR --class-word WORD --placeholder "
              "'<my-concept>' --out CONCEPT_DIR`, or PERSVIZ_FINEXL_LORA=<a diffusers LoRA file or folder, e.g. "
              f"{LORA_FILE}> (with PERSVIZ_FINEXL_CLASS=<its class word>)")


class FineXLTargetError(ConceptFolderError):
    """No LoRA to explain at full scale, or one that cannot be used; the message says what to set or train."""


@dataclass(frozen=True)
class FineXLTarget:
    """The LoRA FineXL explains: its weights file, the class word of its probes, where it came from."""

    lora: Path
    class_word: str
    label: str
    concept: Optional[Concept] = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.label}: {self.lora} (probes with the class word {self.class_word!r})"


def _lora_file(path: Path) -> Path:
    f = path / LORA_FILE if path.is_dir() else path
    if not f.is_file():
        raise FineXLTargetError(f"no LoRA at {path}: pass a diffusers {LORA_FILE} file or its folder "
                                "(PERSVIZ_FINEXL_LORA), or a concept folder with a DreamBooth-LoRA run")
    return f


def lora_target(concept_or_lora: Union[Concept, FineXLTarget, str, Path],
                class_word: Optional[str] = None) -> FineXLTarget:
    """The LoRA of a concept (its DreamBooth-LoRA run; a ConceptFolderError naming `persviz train dreambooth` when it
    has none), of a concept folder (one with concept.json), or a LoRA file or folder itself.

    class_word: the class word of the probes; default the concept's, or for a bare LoRA `DEFAULT_CLASS_WORD`."""
    if isinstance(concept_or_lora, FineXLTarget):
        target = concept_or_lora
        return target if class_word is None else FineXLTarget(target.lora, class_word, target.label, target.concept)
    if isinstance(concept_or_lora, Concept):
        concept = concept_or_lora
    else:
        path = Path(concept_or_lora).expanduser()
        if not path.exists():
            raise FineXLTargetError(f"{path} does not exist: pass a concept folder (with {CONCEPT_FILE} and a "
                                    f"DreamBooth-LoRA run) or a diffusers LoRA file or folder")
        if not (path / CONCEPT_FILE).is_file():
            f = _lora_file(path)
            return FineXLTarget(f.resolve(), class_word or DEFAULT_CLASS_WORD, f"LoRA {f.parent.name}/{f.name}")
        concept = read_concept(path)
    f = _lora_file(concept.run_dir(METHOD))
    name = concept.name or Path(concept.folder).name
    return FineXLTarget(f.resolve(), class_word or concept.class_word,
                        f"DreamBooth-LoRA of {name} ({concept.token(METHOD)} {concept.class_word})", concept)


def session_target(sess: Any) -> FineXLTarget:
    """The full-scale target of a persviz.session.Session: PERSVIZ_FINEXL_LORA when set, else the DreamBooth-LoRA of
    PERSVIZ_CONCEPT's first concept (read and checked by ``sess.concept()``); PERSVIZ_FINEXL_CLASS, when set, is the
    probes' class word. Neither set: a FineXLTargetError (`NEEDS_LORA`)."""
    class_word = sess.setting("finexl_class")
    lora = sess.setting("finexl_lora")
    if lora is not None:
        return lora_target(lora, class_word)
    if sess.setting("concept") is None:
        raise FineXLTargetError(NEEDS_LORA)
    return lora_target(sess.concept(), class_word)


def concept_lora_pair(pipe: Pipeline, concept_or_lora: Union[Concept, FineXLTarget, str, Path],
                      **kwargs: Any) -> tuple[LoRAToggleGenerator, LoRAToggleGenerator]:
    """``(base, personalized)`` generators: `pipe` without and with the LoRA of `lora_target(concept_or_lora)`
    (a concept, a concept folder, a LoRA file or folder). kwargs (steps, guidance, batch_size, pipeline arguments)
    go to both generators, as in `lora_pair`."""
    return lora_pair(pipe, lora_target(concept_or_lora).lora, **kwargs)


def class_probes(class_word: str, n: int = N_PROBES, prompt_set: str = PROBE_SET) -> list[str]:
    """The first n prompts of a shipped prompt set with the class word in its '{}' slot (SD 1.5's contextual
    prompts by default: "a dog reading a newspaper in a cafe", ...)."""
    word = str(class_word).strip()
    if not word:
        raise ValueError("class_word must be a word, e.g. 'dog'")
    prompts = load_prompt_set(prompt_set)
    if not 1 <= int(n) <= len(prompts):
        raise ValueError(f"n must be between 1 and {len(prompts)} (the prompts of {prompt_set!r}), got {n}")
    return fill(prompts[:int(n)], word)


@dataclass(frozen=True)
class FullScaleInputs:
    """What notebook 03 needs at full scale: the target, its probes, the concept bank, the generation settings."""

    target: FineXLTarget
    probes: list[str]
    bank: tuple[str, ...]
    generation: dict[str, Any]

    def __str__(self) -> str:
        g = ", ".join(f"{k} {v}" for k, v in self.generation.items())
        return (f"FineXL target: {self.target}\nprobes: {len(self.probes)} {PROBE_SET} prompts, e.g. "
                f"{self.probes[0]!r}\nbank: {len(self.bank)} ART concepts, f(C) by the paper's ', C' append\n"
                f"generation: {g}")


def full_scale_inputs(sess: Any, n_probes: int = N_PROBES) -> FullScaleInputs:
    """`session_target(sess)`, `class_probes` of its class word (``sess.n_probes(n_probes)``: PERSVIZ_PROBES), the
    ART bank and ``sess.generation()`` (steps, guidance, batch_size)."""
    target = session_target(sess)
    return FullScaleInputs(target, class_probes(target.class_word, sess.n_probes(n_probes)), tuple(ART_BANK),
                           dict(sess.generation()))


__all__ = ["DEFAULT_CLASS_WORD", "METHOD", "NEEDS_LORA", "N_PROBES", "PROBE_SET", "FineXLTarget", "FineXLTargetError",
           "FullScaleInputs", "class_probes", "concept_lora_pair", "full_scale_inputs", "lora_target",
           "session_target"]

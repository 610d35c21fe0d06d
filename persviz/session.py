"""One call that opens a notebook: the scale in force, the thread count, the pipeline and the evaluators.

    from persviz.session import setup
    s = setup()                      # ShapesWorld unless PERSVIZ_SCALE=full
    s.pipe, s.clip, s.dino, s.oracle

    s.concept(), s.second_concept()  # concept folders: PERSVIZ_CONCEPT, or on ShapesWorld the shipped ones
    s.generation()                   # steps, guidance, batch_size of every generation call
    s.n_probes(8)                    # contextual prompts of a live study (PERSVIZ_PROBES at full scale)

This is the one place (besides the command line) that reads ``PERSVIZ_SCALE``; everything it loads is handed
to library functions as arguments. It also reads the notebooks' other environment variables into
``Session.settings`` (``PERSVIZ_CONCEPT`` and ``PERSVIZ_PIGEON_WEIGHTS`` at either scale; ``PERSVIZ_STEPS``,
``PERSVIZ_GUIDANCE``, ``PERSVIZ_BATCH_SIZE``, ``PERSVIZ_PROBES``, ``PERSVIZ_FINEXL_LORA``, ``PERSVIZ_FINEXL_CLASS``
at full scale) and sets torch's CPU threads from ``OMP_NUM_THREADS`` (default ``min(2, cores)``, so a notebook
leaves room beside another job). At full scale the pipeline samples as the TEA paper does (DPM-Solver++, 50 steps,
guidance 7) and decodes with VAE slicing.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from persviz.families.base import Pipeline
from persviz.families import assemble_pipeline, family_of
from persviz import loading
from persviz.concept_folder import Concept, ConceptFolderError, read_concept
from persviz.generation import GUIDANCE, STEPS
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR

SCALES = (loading.SHAPESWORLD, "full")
EVALUATORS = ("clip", "dino", "oracle")
# Session.settings key -> (environment variable, read at full scale only)
SETTINGS_ENV: dict[str, tuple[str, bool]] = {
    "concept": ("PERSVIZ_CONCEPT", False),           # concept folder(s) of `persviz train`, comma-separated
    "steps": ("PERSVIZ_STEPS", True),                # sampler steps (default 50, the TEA paper's)
    "guidance": ("PERSVIZ_GUIDANCE", True),          # classifier-free guidance (default 7, the TEA paper's)
    "batch_size": ("PERSVIZ_BATCH_SIZE", True),      # images per pipeline call (default 8)
    "probes": ("PERSVIZ_PROBES", True),              # contextual prompts of the live studies (default: the notebook's)
    "finexl_lora": ("PERSVIZ_FINEXL_LORA", True),    # the LoRA FineXL explains at full scale
    "finexl_class": ("PERSVIZ_FINEXL_CLASS", True),  # the class word of FineXL's probe prompts at full scale
    "pigeon_weights": ("PERSVIZ_PIGEON_WEIGHTS", False),  # development: one Pigeon snapshot for both stages
}
# What every generation call gets: on ShapesWorld persviz.generation's defaults; at full scale the TEA paper's
# sampling (DPM-Solver++ with 50 steps and guidance 7; persviz.tea.concept_study.PAPER_GENERATION) in batches of 8.
SHAPESWORLD_GENERATION: dict[str, Any] = {"steps": STEPS, "guidance": GUIDANCE, "batch_size": 50}
PAPER_GENERATION: dict[str, Any] = {"steps": 50, "guidance": 7.0, "batch_size": 8}
GENERATION_TYPES = {"steps": int, "guidance": float, "batch_size": int}
SHAPESWORLD_STUDIED = "candy"  # the shipped concept notebooks 01-02 study (its collapse is the clearest)
# the second concept of the multi-concept sections: single-token Textual Inversion never learned checkers (docs/world.md)
SHAPESWORLD_SECOND = "spark"
NEEDS_CONCEPT = ("PERSVIZ_SCALE=full needs PERSVIZ_CONCEPT=<concept folder>[,<second concept folder>] (absolute "
                 "paths): a concept folder of your own, made with `persviz train textual-inversion --model "
                 "stable-diffusion-v1-5/stable-diffusion-v1-5 --images DIR --class-word WORD --placeholder "
                 "'<my-concept>' --out CONCEPT_DIR` (and `persviz train dreambooth|custom-diffusion` with the same "
                 "--out for the other methods)")


@dataclass
class Session:
    """What a notebook works with: models (None where not asked for or not available) and the settings in force."""

    scale: str
    pipe: Pipeline = None
    clip: Any = None
    dino: Any = None
    oracle: Any = None
    settings: dict[str, Optional[str]] = field(default_factory=dict)
    threads: int = 1

    @property
    def full(self) -> bool:
        """True at full scale (SD 1.5 and the real evaluators)."""
        return self.scale == "full"

    def setting(self, key: str, default: Any = None) -> Any:
        """settings[key] when its environment variable is set (at a scale that reads it), else `default`."""
        if key not in SETTINGS_ENV:
            raise KeyError(f"unknown setting {key!r}; known: {sorted(SETTINGS_ENV)}")
        value = self.settings.get(key)
        return default if value is None else value

    def require(self, key: str, what: str) -> str:
        """settings[key], or a RuntimeError naming the environment variable and what it should hold."""
        value = self.setting(key)
        if value is None:
            raise RuntimeError(f"PERSVIZ_SCALE={self.scale} needs {SETTINGS_ENV[key][0]}=<{what}>")
        return value

    def number(self, key: str, default: Any, kind: type = int) -> Any:
        """settings[key] read as a positive `kind` (int or float), else `default`; a ValueError naming the variable."""
        value = self.setting(key)
        if value is None:
            return default
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{SETTINGS_ENV[key][0]}={value!r} is not a{'n integer' if kind is int else ' number'}")
        if not number > 0:
            raise ValueError(f"{SETTINGS_ENV[key][0]}={value!r} must be positive")
        return number

    def generation(self) -> dict[str, Any]:
        """steps, guidance and batch_size for every generation call (the keyword arguments of
        persviz.tea.study's functions): ShapesWorld's defaults, or at full scale the TEA paper's 50 steps and
        guidance 7 in batches of 8, each overridden by PERSVIZ_STEPS, PERSVIZ_GUIDANCE, PERSVIZ_BATCH_SIZE."""
        base = PAPER_GENERATION if self.full else SHAPESWORLD_GENERATION
        if self.full and self.pipe is not None:  # the loaded model's family's (SD 1.x: the paper's; SDXL: its own)
            base = {**base, **family_of(self.pipe).generation_defaults(embedded=False)}
        return {k: self.number(k, v, GENERATION_TYPES[k]) for k, v in base.items()}

    def pipeline_model(self) -> str:
        """The model the session's pipeline loads: on ShapesWorld the micro-SD; at full scale the model the concept
        folders of PERSVIZ_CONCEPT were trained on (their concept.json: SD 1.5, SDXL, a folder or a single-file
        checkpoint; a ConceptFolderError naming both when two folders differ), SD 1.5 without PERSVIZ_CONCEPT."""
        if not self.full:
            return loading.SHAPESWORLD
        if self.setting("concept") is None:
            return loading.FULL_DEFAULTS["pipeline"]
        models = list(dict.fromkeys(c.model for c in self.concepts()))
        if len(models) > 1:
            raise ConceptFolderError(f"the concept folders of PERSVIZ_CONCEPT were trained on different models "
                                     f"({', '.join(models)}); a notebook studies one model: pass folders of one")
        return models[0]

    def n_probes(self, default: int) -> int:
        """How many contextual prompts a live study uses: `default`, or PERSVIZ_PROBES at full scale."""
        return self.number("probes", default)

    @property
    def oracle_note(self) -> str:
        """'' on ShapesWorld; at full scale the note a table title carries: the oracle's columns are absent."""
        return " (oracle columns: ShapesWorld only)" if self.full else ""

    def concept_folders(self) -> list[Path]:
        """PERSVIZ_CONCEPT's folders (comma-separated), or on ShapesWorld the shipped ones; at full scale without
        it a ConceptFolderError naming `persviz train` (never a silent fall back to ShapesWorld)."""
        value = self.setting("concept")
        if value is None:
            if self.full:
                raise ConceptFolderError(NEEDS_CONCEPT)
            return [CONCEPTS_DIR / name for name in CONCEPTS]
        folders = [Path(p.strip()).expanduser() for p in value.split(",") if p.strip()]
        if not folders:
            raise ConceptFolderError(f"PERSVIZ_CONCEPT={value!r} names no folder")
        return folders

    def concepts(self) -> list[Concept]:
        """The concepts of concept_folders(), read through persviz.concept_folder and checked against the scale
        (a ShapesWorld concept at full scale, or an SD 1.5 one on ShapesWorld, is a ConceptFolderError)."""
        out = []
        for folder in self.concept_folders():
            concept = read_concept(folder)
            if loading.is_embedded(concept.model) == self.full:
                want = f"PERSVIZ_SCALE={loading.SHAPESWORLD}" if self.full else "PERSVIZ_SCALE=full"
                raise ConceptFolderError(f"the concept in {concept.folder} was trained on {concept.model!r}, but "
                                         f"this session runs at scale {self.scale}; run with {want}, or train the "
                                         f"concept on this scale's model with `persviz train`")
            out.append(concept)
        return out

    def concept(self) -> Concept:
        """The concept a notebook studies: the first of PERSVIZ_CONCEPT, or ShapesWorld's ⟨candy⟩."""
        concepts = self.concepts()
        if self.setting("concept") is None:
            return next(c for c in concepts if c.name == SHAPESWORLD_STUDIED)
        return concepts[0]

    def second_concept(self) -> Optional[Concept]:
        """Another concept for the multi-concept sections: PERSVIZ_CONCEPT's second folder (None without one), or
        on ShapesWorld ⟨spark⟩ (single-token Textual Inversion did not learn ⟨checkers⟩: docs/world.md)."""
        main = self.concept()
        others = [c for c in self.concepts() if c.folder != main.folder]
        if self.setting("concept") is None:
            return next((c for c in others if c.name == SHAPESWORLD_SECOND), None)
        return next(iter(others), None)

    def __str__(self) -> str:
        label = "full (SD 1.5)" if self.full else "ShapesWorld (embedded default)"
        loaded = [k for k in ("pipe", *EVALUATORS) if getattr(self, k) is not None]
        extra = "".join(f" | {k}={v}" for k, v in self.settings.items() if v is not None)
        return f"scale: {label} | {self.threads} threads | loaded: {', '.join(loaded) or 'nothing'}{extra}"


def resolve_scale(scale: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> str:
    """'shapesworld' or 'full': `scale` if given, else the PERSVIZ_SCALE environment variable (default 'shapesworld')."""
    env = os.environ if env is None else env
    value = (scale if scale is not None else env.get(loading.SCALE_ENV, loading.SHAPESWORLD)).strip().lower()
    if value not in SCALES:
        raise ValueError(f"{loading.SCALE_ENV}={value!r} is not understood; use '{loading.SHAPESWORLD}' (default) "
                         f"or 'full'")
    return value


def read_settings(scale: str, env: Optional[Mapping[str, str]] = None) -> dict[str, Optional[str]]:
    """The notebooks' environment settings at `scale`; full-scale-only ones are None on ShapesWorld."""
    env = os.environ if env is None else env
    return {key: (env.get(var) or None) if (scale == "full" or not full_only) else None
            for key, (var, full_only) in SETTINGS_ENV.items()}


def default_threads(env: Optional[Mapping[str, str]] = None) -> int:
    """OMP_NUM_THREADS when set, else min(2, cores): one notebook leaves room beside another job."""
    env = os.environ if env is None else env
    return int(env.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1))


def paper_sampling(pipe: Pipeline) -> Any:
    """The TEA paper's sampler on an SD 1.x pipeline: DPM-Solver++ (diffusers' DPMSolverMultistepScheduler with
    algorithm_type 'dpmsolver++', from the pipeline's own scheduler config) and VAE slicing (decode one image at a
    time, so 512 px batches fit a small GPU). Returns the pipeline, changed in place."""
    return family_of(pipe).prepare(pipe, embedded=False)


def setup(pipeline: bool = True, evaluators: Iterable[str] = EVALUATORS, scale: Optional[str] = None,
          device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
          threads: Optional[int] = None) -> Session:
    """Set torch's threads, then load the pipeline and the evaluators for the scale in force.

    pipeline: load the Stable Diffusion pipeline (the micro-SD on ShapesWorld; at full scale the model of the concept
        folders in PERSVIZ_CONCEPT, its family from concept.json's model: SD 1.5, SDXL, ...; SD 1.5 without them).
    evaluators: any of 'clip', 'dino', 'oracle'; the oracle exists for ShapesWorld only and is None at full scale.
    scale: 'shapesworld' or 'full'; None reads PERSVIZ_SCALE. device/dtype: as `persviz.loading.pick_device`.
    threads: torch CPU threads; None reads OMP_NUM_THREADS (default min(2, cores)).
    At full scale the pipeline gets paper_sampling (DPM-Solver++, VAE slicing); bad PERSVIZ_STEPS, PERSVIZ_GUIDANCE,
    PERSVIZ_BATCH_SIZE or PERSVIZ_PROBES values fail here, before anything is loaded."""
    kinds = tuple(evaluators)
    unknown = [k for k in kinds if k not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluators {unknown}; choose from {EVALUATORS}")
    scale = resolve_scale(scale)
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    full = scale == "full"
    models = {kind: (loading.FULL_DEFAULTS[kind] if full else loading.SHAPESWORLD) for kind in ("pipeline", "clip", "dino")}
    session = Session(scale=scale, settings=read_settings(scale), threads=n)
    session.generation(), session.n_probes(1)  # a bad number fails before the models load
    if pipeline:  # at full scale the concepts' model (its family from concept.json's model), else SD 1.5
        models["pipeline"] = session.pipeline_model()
    if pipeline:
        session.pipe = assemble_pipeline(models["pipeline"], device=device, dtype=dtype)  # the paper's sampler at full scale
    for kind in kinds:
        if kind == "oracle":
            session.oracle = None if full else loading.load_evaluator(loading.SHAPESWORLD, kind="oracle", device=device,
                                                                      dtype=dtype)
        else:
            setattr(session, kind, loading.load_evaluator(models[kind], kind=kind, device=device, dtype=dtype))
    return session


__all__ = ["EVALUATORS", "NEEDS_CONCEPT", "PAPER_GENERATION", "SCALES", "SETTINGS_ENV", "SHAPESWORLD_GENERATION",
           "SHAPESWORLD_STUDIED", "Session", "default_threads", "paper_sampling", "read_settings", "resolve_scale",
           "setup"]

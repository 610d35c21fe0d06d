"""One call that opens a notebook: the scale in force, the thread count, the pipeline and the evaluators.

    from persviz.session import setup
    s = setup()                      # ShapesWorld unless PERSVIZ_SCALE=full
    s.pipe, s.clip, s.dino, s.oracle

This is the one place (besides the command line) that reads ``PERSVIZ_SCALE``; everything it loads is handed
to library functions as arguments. It also reads the notebooks' other environment variables into
``Session.settings`` (``PERSVIZ_TI_RUNS``, ``PERSVIZ_FINEXL_LORA``, ``PERSVIZ_FINEXL_CLASS`` at full scale,
``PERSVIZ_PIGEON_WEIGHTS`` at either scale) and sets torch's CPU threads from ``OMP_NUM_THREADS``
(default ``min(2, cores)``, so a notebook leaves room beside another job).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from persviz import loading

SCALES = (loading.SHAPESWORLD, "full")
EVALUATORS = ("clip", "dino", "oracle")
# Session.settings key -> (environment variable, read at full scale only)
SETTINGS_ENV: dict[str, tuple[str, bool]] = {
    "ti_runs": ("PERSVIZ_TI_RUNS", True),            # folder of your SD 1.5 personalization runs (ti/, db/, cd/)
    "finexl_lora": ("PERSVIZ_FINEXL_LORA", True),    # the LoRA FineXL explains at full scale
    "finexl_class": ("PERSVIZ_FINEXL_CLASS", True),  # the class word of FineXL's probe prompts at full scale
    "pigeon_weights": ("PERSVIZ_PIGEON_WEIGHTS", False),  # development: one Pigeon snapshot for both stages
}


@dataclass
class Session:
    """What a notebook works with: models (None where not asked for or not available) and the settings in force."""

    scale: str
    pipe: Any = None
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


def setup(pipeline: bool = True, evaluators: Iterable[str] = EVALUATORS, scale: Optional[str] = None,
          device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
          threads: Optional[int] = None) -> Session:
    """Set torch's threads, then load the pipeline and the evaluators for the scale in force.

    pipeline: load the Stable Diffusion pipeline (the micro-SD on ShapesWorld, SD 1.5 at full scale).
    evaluators: any of 'clip', 'dino', 'oracle'; the oracle exists for ShapesWorld only and is None at full scale.
    scale: 'shapesworld' or 'full'; None reads PERSVIZ_SCALE. device/dtype: as `persviz.loading.pick_device`.
    threads: torch CPU threads; None reads OMP_NUM_THREADS (default min(2, cores))."""
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
    if pipeline:
        session.pipe = loading.load_pipeline(models["pipeline"], device=device, dtype=dtype)
    for kind in kinds:
        if kind == "oracle":
            session.oracle = None if full else loading.load_evaluator(loading.SHAPESWORLD, kind="oracle", device=device,
                                                                      dtype=dtype)
        else:
            setattr(session, kind, loading.load_evaluator(models[kind], kind=kind, device=device, dtype=dtype))
    return session


__all__ = ["EVALUATORS", "SCALES", "SETTINGS_ENV", "Session", "default_threads", "read_settings", "resolve_scale",
           "setup"]

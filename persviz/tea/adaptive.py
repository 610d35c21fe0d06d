"""Adaptive TEA: choose the rotation per prompt instead of the paper's fixed default (its Sec. 5.2 future work).

The paper fixes rotation 0.2 / scale 0.5 for every prompt (docs/tea.md §2, §7). A larger rotation aligns the image
better with the prompt's context and costs concept fidelity (its Table 1: CLIP-T of the context rises, CLIP-I falls).
`adaptive_tea` walks a short rotation schedule upward for one prompt and stops at the first rotation whose context
score reaches a target, never accepting one whose fidelity falls below a floor:

    gen, score = make_tea_scorer(pipe, "a <v> on a navy background", "<v>", "circle", clip, refs, "on a navy background")
    result = adaptive_tea(gen, score, target=25.0, floor=0.7)
    result.rotation, result.images, result.trace

The search is pure (callables in, result out); `make_tea_scorer` builds the callables from a pipeline with
persviz.tea.pipeline.tea (token-level TEA, Eq. 1) and persviz.metrics (CLIP-T of the context, CLIP-I).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Union

from persviz.families.base import Pipeline
from persviz.generation import GUIDANCE, STEPS, generate
from persviz.metrics import ImagesLike, clip_score, as_images, mean_cosine, as_texts
from persviz.tea.adjust import check_knob
from persviz.tea.pipeline import check_knobs, tea

#: The schedule tried by default: no rotation, then steps of 0.1 up to half-way to the class word.
SCHEDULE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)

Status = Literal["target", "floor", "exhausted", "none_acceptable"]
ScaleLike = Union[float, Callable[[float], float], None]


@dataclass(frozen=True)
class TraceStep:
    """One tried rotation: the knobs, the two scores and whether the fidelity kept to the floor."""

    rotation: float
    scale: float
    context: float
    fidelity: float
    acceptable: bool


@dataclass(frozen=True)
class AdaptiveResult:
    """What adaptive_tea chose, why, and every rotation it tried (in the order tried).

    rotation/scale are None when no tried rotation kept to the floor (status "none_acceptable"); images are
    what generate_fn returned for the chosen rotation (None then too).
    """

    rotation: Optional[float]
    scale: Optional[float]
    status: Status
    trace: tuple[TraceStep, ...]
    images: Any = None

    @property
    def reached_target(self) -> bool:
        """True when the chosen rotation's context score reached the target."""
        return self.status == "target"

    @property
    def chosen(self) -> Optional[TraceStep]:
        """The trace step of the chosen rotation (None if nothing was acceptable)."""
        return next((s for s in self.trace if s.rotation == self.rotation), None) if self.rotation is not None else None


def _schedule(schedule: Sequence[float]) -> tuple[float, ...]:
    """Rotations checked with tea's check_knob, sorted ascending, duplicates dropped; ValueError if empty."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise ValueError(f"schedule must be a sequence of rotations in [0, 1]; got {schedule!r}")
    if len(schedule) == 0:
        raise ValueError(f"schedule is empty; pass rotations to try, e.g. {SCHEDULE}")
    return tuple(sorted({check_knob(r, f"schedule[{i}] (a rotation)") for i, r in enumerate(schedule)}))


def _threshold(x: Optional[float], name: str, default: float) -> float:
    """A finite threshold (None gives default), or a ValueError."""
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(float(x)):
        raise ValueError(f"{name} must be a number (in the units of score_fn); got {x!r}")
    return float(x)


def _scale_for(scale: ScaleLike, rotation: float, method: str) -> float:
    """The scale at this rotation: a fixed number, a function of the rotation, or tea.DEFAULTS[method] for None."""
    if callable(scale):
        return check_knob(scale(rotation), f"scale({rotation})")
    return check_knobs(method, rotation, scale)[1]


def _scores(out: Any, rotation: float) -> tuple[float, float]:
    """score_fn's (context, fidelity) as two finite floats, or a ValueError."""
    try:
        context, fidelity = out
        context, fidelity = float(context), float(fidelity)
    except (TypeError, ValueError):
        raise ValueError(
            f"score_fn must return (context score, fidelity score); got {out!r} at rotation {rotation}"
        ) from None
    if not (math.isfinite(context) and math.isfinite(fidelity)):
        raise ValueError(f"score_fn returned non-finite scores ({context}, {fidelity}) at rotation {rotation}")
    return context, fidelity


def adaptive_tea(
    generate_fn: Callable[[float, float], Any],
    score_fn: Callable[[Any], tuple[float, float]],
    schedule: Sequence[float] = SCHEDULE,
    *,
    target: float,
    floor: Optional[float] = None,
    scale: ScaleLike = None,
    method: str = "textual_inversion",
    fallback: Literal["last", "best"] = "last",
) -> AdaptiveResult:
    """For one prompt, the smallest rotation on `schedule` whose context score reaches `target` with fidelity >= `floor`.

    Args:
        generate_fn: generate_fn(rotation, scale) -> images, e.g. generation under tea(pipe, ..., rotation, scale).
        score_fn: score_fn(images) -> (context, fidelity), higher is better for both (e.g. CLIP-T of the context
            part, CLIP-I to the references); see make_tea_scorer.
        schedule: rotations in [0, 1]; sorted ascending and de-duplicated whatever the order given, since the
            search assumes that rotating further trades fidelity for context.
        target: the context score to reach (>= counts), in score_fn's units. math.inf never stops early.
        floor: the lowest acceptable fidelity (>= counts); None: no floor.
        scale: fixed in [0, 1]; a function rotation -> scale; None: tea.DEFAULTS[method]["scale"] (0.5 in the paper).
        fallback: when the walk ends without reaching the target, "last" returns the last acceptable rotation
            tried, "best" the acceptable one with the highest context score (they differ when the context
            score does not rise monotonically with the rotation).
    The walk stops at the first rotation whose fidelity falls below the floor, without trying larger ones
    (fidelity is expected to keep falling; each step costs a generation), even if a later one would recover.
    Returns an AdaptiveResult; status is "target" (reached), "floor" (stopped by the floor), "exhausted"
    (schedule ended) or "none_acceptable" (the first rotation already broke the floor; rotation None).
    """
    rotations = _schedule(schedule)
    target = _threshold(target, "target", math.inf)
    floor = _threshold(floor, "floor", -math.inf)
    if fallback not in ("last", "best"):
        raise ValueError(f"fallback must be 'last' or 'best'; got {fallback!r}")
    if not callable(scale):
        check_knobs(method, None, scale)  # an unknown method or a bad fixed scale fails before any generation
    trace: list[TraceStep] = []
    kept: list[tuple[TraceStep, Any]] = []  # acceptable steps with their images ("last" keeps only one)
    status: Status = "exhausted"
    for rotation in rotations:
        s = _scale_for(scale, rotation, method)
        images = generate_fn(rotation, s)
        context, fidelity = _scores(score_fn(images), rotation)
        step = TraceStep(rotation, s, context, fidelity, fidelity >= floor)
        trace.append(step)
        if not step.acceptable:
            status = "floor"
            break
        if fallback == "last":
            kept.clear()
        kept.append((step, images))
        if context >= target:
            status = "target"
            break
    if not kept:
        return AdaptiveResult(None, None, "none_acceptable", tuple(trace))
    if status == "target" or fallback == "last":
        step, images = kept[-1]
    else:
        step, images = max(kept, key=lambda si: si[0].context)  # first of equals: the smallest rotation
    return AdaptiveResult(step.rotation, step.scale, status, tuple(trace), images)


# ----------------------------------------------------------------------------- callables from a pipeline


class TeaScorer(NamedTuple):
    """generate(rotation, scale) -> uint8 images and score(images) -> (context CLIP-T, fidelity), for adaptive_tea."""

    generate: Callable[[float, float], Any]
    score: Callable[[Any], tuple[float, float]]


def make_tea_scorer(
    pipe: Pipeline,
    prompt: str,
    placeholder: str,
    class_word: str,
    evaluator: Any,
    references: ImagesLike,
    context: str,
    *,
    fidelity_evaluator: Any = None,
    n_images: int = 4,
    seed: int = 0,
    guidance: float = GUIDANCE,
    steps: int = STEPS,
    method: str = "textual_inversion",
    **pipe_kwargs: Any,
) -> TeaScorer:
    """Callables for adaptive_tea on one prompt: token-level TEA generation, scored by context CLIP-T and CLIP-I.

    Args:
        pipe: a diffusers pipeline whose tokenizer knows `placeholder` (Textual Inversion loaded).
        prompt: the personalized prompt, e.g. "a <v> on a navy background".
        placeholder, class_word: as for persviz.tea.pipeline.tea.
        evaluator: a CLIP evaluator; the context score is the mean CLIP-T (0..100) against `context`.
        references: the concept's reference images; the fidelity is the mean CLIP-I cosine to them, or DINO-I
            when fidelity_evaluator is a DINO evaluator.
        context: the prompt's context part, e.g. "on a navy background".
        n_images: images per rotation, seeded seed, seed + 1, ... (the same seeds for every rotation).
        guidance, steps, pipe_kwargs: passed to persviz.generation.generate (e.g. height=..., width=...).
    The reference and context embeddings are computed once here.
    """
    if not isinstance(prompt, str) or placeholder not in prompt:
        raise ValueError(f"prompt must be a string containing the placeholder {placeholder!r}; got {prompt!r}")
    if isinstance(n_images, bool) or not isinstance(n_images, numbers.Integral) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer; got {n_images!r}")
    check_knobs(method, None, None)  # an unknown method fails here, not mid-search
    context = as_texts(context, 1, "context")[0]
    fid_eval = evaluator if fidelity_evaluator is None else fidelity_evaluator
    ref_emb = fid_eval.embed_images(as_images(references, "references"))
    ctx_emb = evaluator.embed_texts([context])

    def generate_fn(rotation: float, scale: float) -> Any:
        """n_images images of the prompt with the placeholder adjusted by TEA (rotation, scale)."""
        with tea(pipe, placeholder, class_word, rotation, scale, method):
            return generate(pipe, [prompt] * int(n_images), seed=seed, guidance=guidance, steps=steps, **pipe_kwargs)

    def score_fn(images: Any) -> tuple[float, float]:
        """(mean CLIP-T against the context part, mean fidelity cosine to the references)."""
        images = as_images(images)
        img_emb = evaluator.embed_images(images)
        ctx = clip_score(img_emb, ctx_emb.expand(len(img_emb), -1)).mean()
        fid_emb = img_emb if fid_eval is evaluator else fid_eval.embed_images(images)
        return float(ctx), float(mean_cosine(fid_emb, ref_emb).mean())

    return TeaScorer(generate_fn, score_fn)


__all__ = ["adaptive_tea", "make_tea_scorer", "AdaptiveResult", "TraceStep", "TeaScorer", "SCHEDULE"]

"""Adaptive TEA: the rotation search on hand-made score tables, and one end-to-end run on the tiny pipeline."""
import math

import numpy as np
import pytest
import torch

from persviz.generation import generate
from persviz.metrics import clip_i, clip_t
from persviz.shapesworld.concepts import render_references
from persviz.tea.adaptive import SCHEDULE, AdaptiveResult, TraceStep, adaptive_tea, make_tea_scorer
from persviz.tea.pipeline import tea

from tests.helpers import D, make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Table:
    """Fake generate/score callables: rotation -> (context, fidelity) from a table; records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def generate(self, rotation, scale):
        self.calls.append((rotation, scale))
        return f"images@{rotation}"

    def score(self, images):
        return self.table[float(images.split("@")[1])]


# context rises and fidelity falls with the rotation, as in the paper's Table 1
RISING = {0.0: (20.0, 0.80), 0.1: (22.0, 0.78), 0.2: (25.5, 0.75), 0.3: (27.0, 0.70), 0.4: (28.0, 0.62),
          0.5: (29.0, 0.55)}


def test_stops_at_the_first_rotation_that_reaches_the_target():
    t = Table(RISING)
    res = adaptive_tea(t.generate, t.score, target=25.0, floor=0.6)
    assert isinstance(res, AdaptiveResult)
    assert (res.rotation, res.scale, res.status, res.reached_target) == (0.2, 0.5, "target", True)
    assert [c[0] for c in t.calls] == [0.0, 0.1, 0.2]  # nothing generated past the target
    assert res.trace == (TraceStep(0.0, 0.5, 20.0, 0.80, True), TraceStep(0.1, 0.5, 22.0, 0.78, True),
                         TraceStep(0.2, 0.5, 25.5, 0.75, True))
    assert res.images == "images@0.2" and res.chosen == res.trace[-1]
    assert adaptive_tea(t.generate, t.score, target=25.5).rotation == 0.2  # reaching means >=


def test_never_accepts_a_rotation_below_the_floor():
    t = Table(RISING)
    res = adaptive_tea(t.generate, t.score, target=28.5, floor=0.65)
    assert (res.rotation, res.status, res.reached_target) == (0.3, "floor", False)  # 0.4 reaches 28 < 28.5 anyway
    assert [s.rotation for s in res.trace] == [0.0, 0.1, 0.2, 0.3, 0.4] and not res.trace[-1].acceptable
    assert res.images == "images@0.3"
    # a rotation that reaches the target but breaks the floor is refused too
    res = adaptive_tea(t.generate, t.score, target=28.0, floor=0.65)
    assert (res.rotation, res.status) == (0.3, "floor")


def test_no_acceptable_rotation_and_an_exhausted_schedule():
    t = Table(RISING)
    res = adaptive_tea(t.generate, t.score, target=25.0, floor=0.9)
    assert (res.rotation, res.scale, res.status, res.images, res.chosen) == (None, None, "none_acceptable", None, None)
    assert len(res.trace) == 1
    res = adaptive_tea(t.generate, t.score, target=math.inf)  # no target, no floor: walks the whole schedule
    assert (res.rotation, res.status) == (0.5, "exhausted") and len(res.trace) == len(SCHEDULE)
    assert adaptive_tea(t.generate, t.score, target=100.0, floor=0.0).rotation == 0.5


def test_non_monotone_inputs_are_handled_as_documented():
    # a schedule in any order, with duplicates, is walked sorted ascending
    t = Table(RISING)
    res = adaptive_tea(t.generate, t.score, schedule=(0.3, 0.0, 0.1, 0.1), target=math.inf)
    assert [c[0] for c in t.calls] == [0.0, 0.1, 0.3] and res.rotation == 0.3
    # fidelity dipping below the floor stops the walk, even though it recovers later
    dip = {0.0: (20.0, 0.8), 0.1: (21.0, 0.5), 0.2: (30.0, 0.9)}
    t = Table(dip)
    res = adaptive_tea(t.generate, t.score, schedule=(0.0, 0.1, 0.2), target=25.0, floor=0.6)
    assert (res.rotation, res.status, len(res.trace)) == (0.0, "floor", 2)
    # a context score that rises then falls: fallback "last" (default) or "best"
    hump = {0.0: (20.0, 0.9), 0.1: (24.0, 0.9), 0.2: (22.0, 0.9)}
    t = Table(hump)
    assert adaptive_tea(t.generate, t.score, schedule=(0.0, 0.1, 0.2), target=25.0).rotation == 0.2
    best = adaptive_tea(t.generate, t.score, schedule=(0.0, 0.1, 0.2), target=25.0, fallback="best")
    assert (best.rotation, best.status, best.images) == (0.1, "exhausted", "images@0.1")


def test_scale_fixed_default_or_following_the_rotation():
    t = Table(RISING)
    adaptive_tea(t.generate, t.score, schedule=(0.0, 0.1), target=math.inf, scale=0.25)
    adaptive_tea(t.generate, t.score, schedule=(0.0, 0.1), target=math.inf, scale=lambda r: 0.5 + r)
    adaptive_tea(t.generate, t.score, schedule=(0.0,), target=math.inf, method="dreambooth")
    assert t.calls == [(0.0, 0.25), (0.1, 0.25), (0.0, 0.5), (0.1, 0.6), (0.0, 0.5)]


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": (0.0, 1.5)}, r"schedule\[1\] \(a rotation\) must be a number in \[0, 1\]; got 1.5"),
    ({"schedule": (-0.1,)}, r"schedule\[0\].*\[0, 1\]"),
    ({"schedule": (float("nan"),)}, r"\[0, 1\]"),
    ({"schedule": (True,)}, r"\[0, 1\]"),
    ({"schedule": ()}, "schedule is empty"),
    ({"schedule": "0.1"}, "sequence of rotations"),
    ({"target": float("nan")}, "target must be a number"),
    ({"target": "high"}, "target must be a number"),
    ({"floor": float("nan")}, "floor must be a number"),
    ({"scale": 1.5}, r"scale must be a number in \[0, 1\]"),
    ({"scale": lambda r: 2.0}, r"scale\(0.0\) must be a number in \[0, 1\]"),
    ({"method": "lora"}, "unknown method"),
    ({"fallback": "first"}, "fallback must be"),
])
def test_bad_arguments_fail_before_generating(kwargs, match):
    t = Table(RISING)
    kwargs = {"target": 25.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        adaptive_tea(t.generate, t.score, **kwargs)
    assert t.calls == []


@pytest.mark.parametrize("out", [0.5, (1.0,), ("a", 1.0), (float("nan"), 1.0), (1.0, float("inf"))])
def test_bad_scores_are_refused(out):
    with pytest.raises(ValueError, match="score_fn"):
        adaptive_tea(lambda r, s: None, lambda images: out, target=1.0)


# ----------------------------------------------------------------------------- end to end on the tiny pipeline

PROMPT, CONTEXT = "a <v> on a navy background", "on a navy background"


@pytest.fixture(scope="module")
def ti_pipe():
    pipe = make_tiny_sd_pipeline()
    g = torch.Generator().manual_seed(1)
    pipe.load_textual_inversion({"<v>": 3.0 * torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)})
    return pipe


def test_make_tea_scorer_runs_adaptive_tea_end_to_end(ti_pipe, clip_eval):
    refs = render_references("candy")
    weight = ti_pipe.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    kw = dict(n_images=2, steps=2, guidance=5.0, seed=3)
    gen, score = make_tea_scorer(ti_pipe, PROMPT, "<v>", "circle", clip_eval, refs, CONTEXT, **kw)
    res = adaptive_tea(gen, score, schedule=(0.0, 0.5, 1.0), target=math.inf, floor=-1.0)
    assert res.status == "exhausted" and res.rotation == 1.0 and len(res.trace) == 3
    assert res.images.dtype == np.uint8 and res.images.shape == (2, 16, 16, 3)
    assert torch.equal(weight, before)  # tea restored the placeholder's row after every generation
    # the trace holds the metrics of images generated under tea with the same seeds
    with tea(ti_pipe, "<v>", "circle", 0.5, 0.5):
        images = generate(ti_pipe, [PROMPT] * 2, seed=3, guidance=5.0, steps=2)
    step = res.trace[1]
    assert step.rotation == 0.5 and step.scale == 0.5
    assert step.context == pytest.approx(float(clip_t(clip_eval, images, CONTEXT).mean()), abs=1e-4)
    assert step.fidelity == pytest.approx(float(clip_i(clip_eval, images, refs).mean()), abs=1e-5)
    # the rotation changes the images (the placeholder moves toward "circle")
    assert res.trace[0].fidelity != res.trace[2].fidelity


def test_make_tea_scorer_can_score_fidelity_with_dino(ti_pipe, clip_eval):
    from persviz.loading import load_evaluator
    from persviz.metrics import dino_i
    dino = load_evaluator(kind="dino")
    refs = render_references("spark")
    gen, score = make_tea_scorer(ti_pipe, PROMPT, "<v>", "circle", clip_eval, refs, CONTEXT, fidelity_evaluator=dino,
                                 n_images=2, steps=2)
    images = gen(0.2, 0.5)
    context, fidelity = score(images)
    assert fidelity == pytest.approx(float(dino_i(dino, images, refs).mean()), abs=1e-5)
    assert context == pytest.approx(float(clip_t(clip_eval, images, CONTEXT).mean()), abs=1e-4)


def test_make_tea_scorer_checks_its_arguments(ti_pipe, clip_eval):
    refs = render_references("candy")
    with pytest.raises(ValueError, match="containing the placeholder"):
        make_tea_scorer(ti_pipe, "a circle on a navy background", "<v>", "circle", clip_eval, refs, CONTEXT)
    with pytest.raises(ValueError, match="n_images"):
        make_tea_scorer(ti_pipe, PROMPT, "<v>", "circle", clip_eval, refs, CONTEXT, n_images=0)
    with pytest.raises(ValueError, match="references is empty"):
        make_tea_scorer(ti_pipe, PROMPT, "<v>", "circle", clip_eval, refs[:0], CONTEXT)
    with pytest.raises(ValueError, match="unknown method"):
        make_tea_scorer(ti_pipe, PROMPT, "<v>", "circle", clip_eval, refs, CONTEXT, method="lora")

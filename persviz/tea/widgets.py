"""TEA's notebook explorers, built from stock ipywidgets only (no custom JavaScript); their logic runs without a browser.

    explorer = TEAExplorer(make_tea_generate_fn(pipe, "<cat-toy>", "toy"), prompt="a <cat-toy> on a beach")
    explorer          # last expression of a cell: shows explorer.widget

Tests drive them the way a user would: set `explorer.rotation.value`, call `explorer.button.click()`,
then read `explorer.last`, `explorer.error` and the widgets' values. ``TEAExplorer.from_sweep`` opens on the prompt,
seed and knobs where a saved sweep shows TEA's effect most (persviz.tea.sweep_effects.showcase).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import ipywidgets as W
import numpy as np

from persviz.families.base import Pipeline
from persviz.evaluation import Evaluation
from persviz.generation import GUIDANCE, STEPS, generate
from persviz.io import PathLike
from persviz.tea.adjust import DEFAULTS, check_knob
from persviz.tea.pipeline import tea
from persviz.tea.sweep_effects import showcase
from persviz.widgets import Explorer, html_table, one_image, png_bytes, status_html, tile_images

GenerateFn = Callable[[str, int, float, float], tuple[Any, Any]]
ScoreFn = Callable[[str, np.ndarray, np.ndarray], Mapping[str, Any]]
RenderFn = Callable[[int], Mapping[str, Any]]


def prompt_and_seed_problem(prompt: str, seed: int) -> str | None:
    """The error an explorer shows for an empty prompt or a negative seed; None when both are fine."""
    if not prompt.strip():
        return "error: the prompt is empty; type a prompt that contains the learned token"
    if seed < 0:
        return f"error: seed must be >= 0; got {seed}"
    return None


class TEAExplorer(Explorer):
    """Rotation/scale sliders, prompt and seed, a "generate" button; shows the images before/after TEA and scores.

    Args:
        generate_fn: (prompt, seed, rotation, scale) -> (before_image, after_image), each [H, W, 3]
            uint8 (or float in [0, 1], or PIL); make_tea_generate_fn builds one from a pipeline.
        score_fn: optional (prompt, before, after) -> {name: value} or {name: {column: value}}, shown as a table.
        rotation, scale: the sliders' starting values, in [0, 1] (paper's Textual Inversion defaults).
        auto: also regenerate whenever a slider is released (generation can be slow; off by default).
        image_width: display width of each image in pixels (the PNG keeps its own resolution).
        note: a sentence about the starting inputs (e.g. where they come from), shown in the status line at the
            start and after a generation at exactly those inputs.

    Attributes: rotation, scale (FloatSlider), prompt (Text), seed (IntText), button (Button),
    before_image, after_image (Image), scores, message (HTML), widget (the VBox to display),
    last (dict of the last successful run, or None), error (the last error text, or None).
    Errors (an empty prompt, a negative seed, an exception from generate_fn or score_fn) are shown
    in `message` instead of being raised; the images of the previous run stay on screen. A change of prompt,
    seed or knob (without auto) keeps the images on screen and marks them stale (`stale`, and the status line says
    which inputs they are for) until generate is pressed or the inputs are set back.
    """

    kept_note = " (the images below are from the previous run)"

    def __init__(
        self,
        generate_fn: GenerateFn,
        score_fn: Optional[ScoreFn] = None,
        rotation: float = DEFAULTS["textual_inversion"]["rotation"],
        scale: float = DEFAULTS["textual_inversion"]["scale"],
        prompt: str = "a photo of <V*>",
        seed: int = 0,
        auto: bool = False,
        image_width: int = 256,
        note: str = "",
    ) -> None:
        if not callable(generate_fn):
            raise ValueError("generate_fn must be callable: (prompt, seed, rotation, scale) -> (before, after)")
        if score_fn is not None and not callable(score_fn):
            raise ValueError("score_fn must be callable: (prompt, before, after) -> dict, or None")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int; got {seed!r}")
        super().__init__()
        self.generate_fn = generate_fn
        self.score_fn = score_fn
        slider = dict(min=0.0, max=1.0, step=0.05, continuous_update=False, readout_format=".2f")
        self.rotation = W.FloatSlider(value=check_knob(rotation, "rotation"), description="rotation", **slider)
        self.scale = W.FloatSlider(value=check_knob(scale, "scale"), description="scale", **slider)
        self.prompt = W.Text(value=str(prompt), description="prompt", layout=W.Layout(width="32em"))
        self.seed = W.IntText(value=int(seed), description="seed", layout=W.Layout(width="12em"))
        self.button = W.Button(description="generate", button_style="primary", icon="play")
        self.note, self.note_state = str(note), self.state
        self.message = W.HTML(status_html(f"{self.note}; press generate" if self.note
                                          else "set the knobs and press generate"))
        self.before_image = W.Image(format="png", width=int(image_width))
        self.after_image = W.Image(format="png", width=int(image_width))
        self.scores = W.HTML("")
        self.button.on_click(lambda _b: self.update())
        for w in (self.rotation, self.scale, self.prompt, self.seed):  # before auto's: a failed regenerate's error wins
            w.observe(lambda _change: self.on_input(), names="value")
        if auto:
            for w in (self.rotation, self.scale):
                w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([
            W.HBox([self.rotation, self.scale]),
            W.HBox([self.prompt, self.seed, self.button]),
            self.message,
            W.HBox([
                W.VBox([W.HTML("<b>before TEA</b>"), self.before_image]),
                W.VBox([W.HTML("<b>after TEA</b>"), self.after_image]),
            ]),
            self.scores,
        ])

    @classmethod
    def from_sweep(cls, generate_fn: GenerateFn, sweep: Evaluation | PathLike, placeholder: str,
                   metric: Optional[str] = None, **kwargs: Any) -> "TEAExplorer":
        """A TEAExplorer opened on the prompt, seed and knobs where a saved sweep (``persviz sweep``'s sweep.json)
        shows TEA raising `metric` most (persviz.tea.sweep_effects.showcase), saying so in its status line."""
        ev = sweep if isinstance(sweep, Evaluation) else Evaluation.load(sweep)
        best = showcase(ev, metric)
        m, b, a = best["metric"], best["before"], best["after"]
        if m.startswith("oracle_"):
            said = (f"the oracle read the {m[len('oracle_'):]} {'right' if b else 'wrong'} before TEA and "
                    f"{'right' if a else 'wrong'} after")
        else:
            said = f"{m} {b:.3g} before TEA, {a:.3g} after"
        note = (f"opened where the saved sweep shows TEA most ({best['searched']} images searched): at rotation "
                f"{best['rotation']:g}, scale {best['scale']:g}, seed {best['seed']} {said}")
        return cls(generate_fn, prompt=best["prompt"].format(placeholder), seed=best["seed"],
                   rotation=best["rotation"], scale=best["scale"], note=note, **kwargs)

    @property
    def state(self) -> dict[str, Any]:
        """The current inputs: prompt, seed, rotation, scale."""
        return {"prompt": self.prompt.value, "seed": int(self.seed.value),
                "rotation": float(self.rotation.value), "scale": float(self.scale.value)}

    def status(self, s: dict[str, Any], with_note: bool = True) -> str:
        """The status line of a generation at inputs s (with the note when s are the starting inputs)."""
        line = f"seed {s['seed']}, rotation {s['rotation']:.2f}, scale {s['scale']:.2f}: {s['prompt']}"
        return f"{line} ({self.note})" if with_note and self.note and s == self.note_state else line

    def on_input(self) -> None:
        """An input changed: the images on screen are marked stale, or current again when the inputs are theirs."""
        if self.last is None:
            return
        shown = {k: self.last[k] for k in self.state}
        if self.state != shown:
            self.mark_stale(f"the images below are for {self.status(shown, False)}; press generate for the new inputs")
        elif self.stale:
            self.succeed(self.status(shown))

    def update(self) -> bool:
        """Generate for the current state and show it; returns False (and shows the error) instead of raising."""
        s = self.state
        problem = prompt_and_seed_problem(s["prompt"], s["seed"])
        if problem:
            return self.fail(problem)

        def compute() -> tuple[np.ndarray, np.ndarray, tuple[bytes, bytes], dict[str, Any], str]:
            out = self.generate_fn(s["prompt"], s["seed"], s["rotation"], s["scale"])
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError(f"generate_fn must return (before_image, after_image); got {type(out).__name__}")
            before, after = one_image(out[0]), one_image(out[1])
            scores = dict(self.score_fn(s["prompt"], before, after)) if self.score_fn is not None else {}
            return before, after, (png_bytes(before), png_bytes(after)), scores, html_table(scores) if scores else ""

        ok, done = self.attempt(compute, busy="generating ...")
        if not ok:
            return False
        before, after, pngs, scores, table = done
        self.before_image.value, self.after_image.value = pngs
        self.scores.value = table
        self.last = {**s, "before": before, "after": after, "scores": scores}
        return self.succeed(self.status(s))


class SnapshotExplorer(Explorer):
    """A slider over saved training steps; render_fn(step) -> {'norm': x, 'shift': x or {name: x}, 'images': uint8}.

    Every key but 'images' is shown in an HTML table; 'images' ([H, W, 3] or [N, H, W, 3]) is shown
    side by side. Exceptions from render_fn are shown in `message` instead of being raised.
    Attributes: slider (SelectionSlider), info, message (HTML), image (Image), widget (VBox),
    last (the last rendered dict), error (the last error text, or None).
    """

    def __init__(self, steps: Sequence[int], render_fn: RenderFn, step: Optional[int] = None,
                 image_width: int = 512, render_now: bool = True) -> None:
        if not callable(render_fn):
            raise ValueError("render_fn must be callable: step -> dict")
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise ValueError(f"steps must be a non-empty list of ints; got {steps!r}")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in steps):
            raise ValueError(f"steps must be ints; got {list(steps)!r}")
        steps = [int(t) for t in steps]
        if len(set(steps)) != len(steps):
            raise ValueError(f"steps must be distinct; got {steps}")
        if step is not None and step not in steps:
            raise ValueError(f"step {step!r} is not one of the saved steps {steps}")
        super().__init__()
        self.render_fn = render_fn
        self.steps = steps
        self.slider = W.SelectionSlider(options=steps, value=steps[0] if step is None else step,
                                        description="step", continuous_update=False)
        self.message = W.HTML("")
        self.info = W.HTML("")
        self.image = W.Image(format="png", width=int(image_width))
        self.image.layout.display = "none"
        self.slider.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([self.slider, self.message, self.info, self.image])
        if render_now:
            self.update()

    @property
    def state(self) -> dict[str, Any]:
        """The current input: the selected step."""
        return {"step": self.slider.value}

    def update(self) -> bool:
        """Render the selected step; returns False (and shows the error) instead of raising."""
        step = self.slider.value

        def compute() -> tuple[dict[str, Any], bytes | None, str]:
            out = self.render_fn(step)
            if not isinstance(out, Mapping):
                raise ValueError(f"render_fn must return a dict; got {type(out).__name__}")
            out = dict(out)
            png = png_bytes(tile_images(out["images"])) if out.get("images") is not None else None
            return out, png, html_table({"step": step, **{k: v for k, v in out.items() if k != "images"}})

        ok, done = self.attempt(compute, context=f"error at step {step}")
        if not ok:
            return False
        out, png, table = done
        self.info.value = table
        if png is None:
            self.image.value = b""
            self.image.layout.display = "none"
        else:
            self.image.value = png
            self.image.layout.display = None
        self.last = {"step": step, **out}
        return self.succeed()


def make_tea_generate_fn(
    pipe: Pipeline,
    placeholder: str,
    class_word: str,
    method: str = "textual_inversion",
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    **pipe_kwargs: Any,
) -> GenerateFn:
    """A TEAExplorer generate_fn: the same seed without and with token-level TEA (persviz.tea.pipeline.tea).

    Checks placeholder, class word and method once here (so a typo fails in the cell that builds the
    explorer); the returned function refuses a prompt without the placeholder, since TEA would
    leave it unchanged. Extra keyword arguments (height, width, negative_prompt ...) go to the pipeline.
    Prompt-level TEA for DreamBooth (encode_prompt_level) is not covered by this adapter.
    """
    with tea(pipe, placeholder, class_word, method=method):  # validation only; rows restored on exit
        pass

    def generate_fn(prompt: str, seed: int, rotation: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
        if placeholder not in prompt:
            raise ValueError(f"the prompt must contain the learned token {placeholder!r}; got {prompt!r}")
        kw = dict(seed=int(seed), guidance=guidance, steps=steps, **pipe_kwargs)
        before = generate(pipe, [prompt], **kw)[0]
        with tea(pipe, placeholder, class_word, rotation=rotation, scale=scale, method=method):
            after = generate(pipe, [prompt], **kw)[0]
        return before, after

    return generate_fn

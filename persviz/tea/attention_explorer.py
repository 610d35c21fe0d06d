"""Where each word of a prompt looks, before and after TEA: a notebook explorer over persviz.attention's maps.

    explorer = AttentionExplorer(make_attention_maps_fn(pipe, "<candy>", "circle"), prompt="a <candy> on a black background")
    explorer          # last expression of a cell: prompt, seed, generate; word picker, layer and step sliders

"generate" makes one image without and one with token-level TEA (same seed) and keeps every (layer, step) map
(``attention_maps(..., keep="all")``); the word picker and the sliders then redraw from what was kept, without
generating again. Stock ipywidgets; tests drive it without a browser.
"""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import Any, Optional

import ipywidgets as W
import numpy as np

from persviz.families.base import Pipeline
from persviz.attention import AttentionMaps, attention_maps, prompt_words
from persviz.attention_plots import overlay_rgb
from persviz.generation import GUIDANCE, STEPS, generate
from persviz.tea.pipeline import tea
from persviz.tea.widgets import prompt_and_seed_problem
from persviz.widgets import Explorer, html_table, one_image, png_bytes, status_html

MapsFn = Callable[[str, int, bool], tuple[Any, AttentionMaps]]  # (prompt, seed, with TEA) -> (image, maps)
ALL = -1  # the sliders' value for "mean over all layers / steps"


def make_attention_maps_fn(pipe: Pipeline, placeholder: str, class_word: str, method: str = "textual_inversion",
                           steps: int = STEPS, guidance: float = GUIDANCE, **pipe_kwargs: Any) -> MapsFn:
    """An AttentionExplorer maps_fn: one image of the prompt (seeded as persviz.generation.generate) with every
    word's per-(layer, step) maps, untouched or inside token-level TEA (persviz.tea.pipeline.tea)."""
    with tea(pipe, placeholder, class_word, method=method):  # validation only: a typo fails where it is built
        pass

    def maps_fn(prompt: str, seed: int, with_tea: bool) -> tuple[np.ndarray, AttentionMaps]:
        if placeholder not in prompt:
            raise ValueError(f"the prompt must contain the learned token {placeholder!r}; got {prompt!r}")
        adjust = tea(pipe, placeholder, class_word, method=method) if with_tea else contextlib.nullcontext()
        with adjust, attention_maps(pipe, prompt_words(prompt), keep="all") as maps:
            image = generate(pipe, [prompt], seed=int(seed), guidance=guidance, steps=steps, **pipe_kwargs)[0]
        return image, maps

    return maps_fn


class AttentionExplorer(Explorer):
    """Prompt, seed and "generate"; then a word picker, a layer and a sampler-step slider (−1: the mean over all),
    and the word's map over the image before and after TEA, with its share of the word-token attention.

    Args:
        maps_fn: (prompt, seed, with_tea) -> (image, AttentionMaps kept with keep="all"); make_attention_maps_fn
            builds one from a pipeline.
        prompt, seed: the starting inputs; word: the word picked first (default the first of the prompt's that
            starts with '<', else its first).
        image_width: display width of each overlay in pixels.

    Attributes: prompt (Text), seed (IntText), button (Button), word (Dropdown), layer, step (IntSlider),
    before_image, after_image (Image), shares (HTML), message (HTML), widget (VBox), last (dict: the inputs, the
    images, the maps shown, the shares; None before a success), error (text or None), stale (True while the prompt
    or seed differs from the generated run's). Errors (an empty prompt, a negative seed, an exception of maps_fn) are
    shown in `message`; the previous run stays on screen. A new prompt or seed keeps the run on screen, marked stale
    in the status line, until generate (the word picker and sliders still redraw that run).
    """

    kept_note = " (the maps below are from the previous run)"

    def __init__(self, maps_fn: MapsFn, prompt: str = "a photo of <V*>", seed: int = 0, word: Optional[str] = None,
                 image_width: int = 256) -> None:
        if not callable(maps_fn):
            raise ValueError("maps_fn must be callable: (prompt, seed, with_tea) -> (image, AttentionMaps)")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int; got {seed!r}")
        super().__init__()
        self.maps_fn, self.first_word = maps_fn, word
        self.prompt = W.Text(value=str(prompt), description="prompt", layout=W.Layout(width="32em"))
        self.seed = W.IntText(value=int(seed), description="seed", layout=W.Layout(width="12em"))
        self.button = W.Button(description="generate", button_style="primary", icon="play")
        self.word = W.Dropdown(options=[], description="word")
        self.layer = W.IntSlider(value=ALL, min=ALL, max=ALL, description="layer", continuous_update=False)
        self.step = W.IntSlider(value=ALL, min=ALL, max=ALL, description="step", continuous_update=False)
        self.where = W.HTML("")
        self.message = W.HTML(status_html("type a prompt with the learned token and press generate"))
        self.before_image = W.Image(format="png", width=int(image_width))
        self.after_image = W.Image(format="png", width=int(image_width))
        self.shares = W.HTML("")
        self.runs: Optional[dict[str, Any]] = None  # {'prompt', 'seed', 'before': (image, maps), 'after': ...}
        self._syncing = False
        self.button.on_click(lambda _b: self.update())
        for w in (self.word, self.layer, self.step):
            w.observe(lambda _change: self.redraw(), names="value")
        for w in (self.prompt, self.seed):
            w.observe(lambda _change: self.on_input(), names="value")
        self.widget = W.VBox([
            W.HBox([self.prompt, self.seed, self.button]),
            W.HBox([self.word, self.layer, self.step]), self.where, self.message,
            W.HBox([W.VBox([W.HTML("<b>before TEA</b>"), self.before_image]),
                    W.VBox([W.HTML("<b>after TEA</b>"), self.after_image])]),
            self.shares])

    @property
    def state(self) -> dict[str, Any]:
        """The current inputs: prompt, seed, word, layer, step (None for the mean over all)."""
        return {"prompt": self.prompt.value, "seed": int(self.seed.value), "word": self.word.value,
                "layer": None if self.layer.value == ALL else int(self.layer.value),
                "step": None if self.step.value == ALL else int(self.step.value)}

    def update(self) -> bool:
        """Generate before and after TEA for the prompt and seed, then draw; False (the error shown) on failure."""
        s = self.state
        problem = prompt_and_seed_problem(s["prompt"], s["seed"])
        if problem:
            return self.fail(problem)

        def compute() -> dict[str, Any]:
            runs = {"prompt": s["prompt"], "seed": s["seed"]}
            for key, with_tea in (("before", False), ("after", True)):
                image, maps = self.maps_fn(s["prompt"], s["seed"], with_tea)
                if not isinstance(maps, AttentionMaps) or maps.keep != "all":
                    raise ValueError('maps_fn must return the maps of attention_maps(..., keep="all")')
                runs[key] = (one_image(image), maps)
            return runs

        ok, runs = self.attempt(compute, busy="generating ...")
        if not ok:
            return False
        self.runs = runs
        maps = runs["before"][1]
        self._syncing = True  # the controls follow the new maps; one redraw after
        try:
            words = list(maps.words)
            keep = self.word.value if self.word.value in words else None
            first = self.first_word if self.first_word in words else next((w for w in words if w.startswith("<")),
                                                                          words[0])
            self.word.options = words
            self.word.value = keep or first
            self.layer.max, self.step.max = maps.n_layers - 1, maps.n_steps - 1
        finally:
            self._syncing = False
        return self.redraw()

    def redraw(self) -> bool:
        """Draw the picked word's map (layer, step) over both images from the kept maps; nothing is generated."""
        if self._syncing or self.runs is None or self.word.value is None:
            return False
        s = self.state
        layer, step = s["layer"], s["step"]

        def compute() -> dict[str, Any]:
            shown = {k: self.runs[k][1].view(s["word"], layer, step).numpy() for k in ("before", "after")}
            top = max(float(m.max()) for m in shown.values()) or 1.0  # one colour scale: before and after compare
            pngs = {k: png_bytes(overlay_rgb(self.runs[k][0], shown[k], vmax=top)) for k in shown}
            shares = {k: {"share of word attention": float(self.runs[k][1].shares[s["word"]][0]),
                          "start token (of all)": float(self.runs[k][1].special["start"][0])} for k in shown}
            return {"maps": shown, "pngs": pngs, "shares": shares}

        ok, done = self.attempt(compute, context="drawing")
        if not ok:
            return False
        self.before_image.value, self.after_image.value = done["pngs"]["before"], done["pngs"]["after"]
        self.shares.value = html_table({f"{k} TEA": v for k, v in done["shares"].items()})
        maps = self.runs["before"][1]
        where = ("all layers" if layer is None else f"layer {layer}: {maps.layer_names[layer]} "
                 f"({maps.layer_resolutions[layer][0]}×{maps.layer_resolutions[layer][1]})")
        when = "all steps" if step is None else f"step {step} (t = {maps.timesteps[step]:g})"
        self.where.value = status_html(f"{where}, {when}")
        self.last = {**s, "prompt": self.runs["prompt"], "seed": self.runs["seed"],  # the run's, even when stale
                     "before": self.runs["before"][0], "after": self.runs["after"][0], **done}
        self.succeed(f"seed {self.runs['seed']}: {self.runs['prompt']}")
        self.on_input()
        return True

    def on_input(self) -> None:
        """A new prompt or seed: the run on screen is marked stale (current again when they are set back)."""
        if self.runs is None:
            return
        s, shown = self.state, f"seed {self.runs['seed']}: {self.runs['prompt']}"
        if (s["prompt"], s["seed"]) != (self.runs["prompt"], self.runs["seed"]):
            self.mark_stale(f"the maps below are for {shown}; press generate for the new prompt and seed")
        elif self.stale:
            self.succeed(shown)


__all__ = ["ALL", "AttentionExplorer", "make_attention_maps_fn"]

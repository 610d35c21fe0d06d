"""An explorer of Pigeon on ShapesWorld users, from stock ipywidgets (no custom JavaScript); logic runs headless.

    explorer = PigeonExplorer(pipe, heldout_dataset(0.4))
    explorer.update()     # or press "generate"
    explorer              # last expression of a cell: shows explorer.widget

Tests drive it as a user would: set ``explorer.user.value`` / ``explorer.window.value``, call
``explorer.button.click()`` (or ``update()``), then read ``explorer.last`` and ``explorer.error``.
Picking another user or window redraws the history at once and clears the generations of the previous window
(the status line says to press generate); another seed keeps them on screen, marked stale, until generate.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import numpy as np

from persviz.images import as_uint8
from persviz.widgets import Explorer, html_table, png_bytes, status_html
from persviz.pigeon.model import RATIOS, PigeonPipeline
from persviz.pigeon.plots import LIKED_COLOR, NOISE_COLOR, REFERENCE_COLOR, SELECTED_COLOR, tile_canvas, token_overlay
from persviz.pigeon.study import reference_masks, window_masks
from persviz.pigeon.users import PigeonDataset, check_ratio


class PigeonExplorer(Explorer):
    """Pick a user and one of their windows: the history with the tokens the mask generator keeps, then the
    generation at every reference mask ratio with CLIP-T, history score and the selected ratio.

    Args:
        pipe: the PigeonPipeline (with a ClipScorer).
        dataset: the users to pick from (e.g. ``study.heldout_dataset`` or the "test" split of ``make_datasets``).
        ratios: reference mask ratios of the sweep.
        num_inference_steps, guidance_scale: the sampler's.
        seed: initial latents' seed (shared by all ratios).
        scale: enlargement of the 32-pixel images.
        render_now: show the first window's history masks at once (cheap; generation waits for the button).

    Attributes: user, window (Dropdown), seed (IntText), button (Button), message, scores (HTML),
    history_image, sweep_image (Image), widget (VBox), last (dict of the last generation or None),
    shown (the inputs of the generation on screen, or None when none is), masks (the last ``study.window_masks``),
    error (last error text or None), stale (True while the generation shown is for another seed).
    Errors are shown, not raised.
    """

    def __init__(self, pipe: PigeonPipeline, dataset: PigeonDataset, ratios: Sequence[float] = RATIOS,
                 num_inference_steps: int = 25, guidance_scale: float = 4.0, seed: int = 0, scale: int = 4,
                 render_now: bool = True) -> None:
        if not isinstance(pipe, PigeonPipeline):
            raise ValueError(f"pipe must be a PigeonPipeline; got {type(pipe).__name__}")
        if not isinstance(dataset, PigeonDataset) or len(dataset) == 0:
            raise ValueError("dataset must be a non-empty PigeonDataset (e.g. study.heldout_dataset(0.4))")
        if not ratios:
            raise ValueError("ratios is empty; pass e.g. (0.0, 0.25, 0.5, 0.75, 1.0)")
        for r in ratios:
            check_ratio(r)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int; got {seed!r}")
        super().__init__()
        self.pipe, self.dataset, self.ratios = pipe, dataset, tuple(float(r) for r in ratios)
        self.steps, self.guidance, self.scale = int(num_inference_steps), float(guidance_scale), int(scale)
        self.masks: dict[str, Any] | None = None
        self.shown: dict[str, Any] | None = None
        self.history_window: int | None = None  # the window whose history is on screen
        users = sorted({w.user_id for w in dataset.windows})
        opts = [(f"user {u}: {dataset.users[u].taste.describe()} (noise {dataset.users[u].noise_rate:g})", u)
                for u in users]
        self.user = W.Dropdown(options=opts, value=users[0], description="user", layout=W.Layout(width="40em"))
        self.window = W.Dropdown(options=self._window_options(users[0]), description="window",
                                 layout=W.Layout(width="28em"))
        self.seed = W.IntText(value=int(seed), description="seed", layout=W.Layout(width="12em"))
        self.button = W.Button(description="generate", button_style="primary", icon="play")
        self.message = W.HTML(status_html("pick a user and a window, then press generate"))
        self.history_image = W.Image(format="png")
        self.sweep_image = W.Image(format="png")
        self.sweep_image.layout.display = "none"
        self.scores = W.HTML("")
        self.user.observe(self.on_user, names="value")
        self.window.observe(lambda _change: self.show_history(), names="value")
        self.seed.observe(lambda _change: self.on_seed(), names="value")
        self.button.on_click(lambda _b: self.update())
        self.widget = W.VBox([self.user, W.HBox([self.window, self.seed, self.button]), self.message,
                              W.HTML("<b>history (red frame: noise) and reference; "
                                     "dark hatched patches are masked</b>"),
                              self.history_image,
                              W.HTML("<b>reference kept at each ratio (top) and the generation (orange: selected)</b>"),
                              self.sweep_image, self.scores])
        if render_now:
            self.show_history()

    def _window_options(self, user_id: int) -> list[tuple[str, int]]:
        out = []
        for i, w in enumerate(self.dataset.windows):
            if w.user_id == user_id:
                out.append((f"interactions {w.start}-{w.start + len(w.history)}: '{w.instruction}' "
                            f"({sum(w.history_is_noise)} noise)", i))
        return out

    @property
    def state(self) -> dict[str, Any]:
        """The current inputs: user, window index (into the dataset), seed."""
        return {"user": self.user.value, "window": self.window.value, "seed": int(self.seed.value)}

    def on_user(self, change: Any = None) -> None:
        """A new user: list their windows and show the first one's history."""
        opts = self._window_options(self.user.value)
        self.window.options = opts  # resets the value to the first option (and calls show_history)
        if opts and self.window.value != opts[0][1]:
            self.window.value = opts[0][1]

    def show_history(self) -> bool:
        """Draw the selected window's history and reference with the kept tokens (no generation)."""
        idx = self.window.value
        if idx is None:
            self.clear_generation()
            self.history_image.value, self.history_window = b"", None
            return self.fail("error: this user has no window; pick another user")

        def compute() -> tuple[dict[str, Any], bytes]:
            m = window_masks(self.pipe, self.dataset, int(idx), reference_ratio=0.5)
            row = [token_overlay(im, k, NOISE_COLOR if nz else LIKED_COLOR, self.scale)
                   for im, k, nz in zip(m["history"], m["history_mask"], m["history_is_noise"])]
            row += [None, token_overlay(m["reference"], None, REFERENCE_COLOR, self.scale)]
            return m, png_bytes(tile_canvas([row])[0])

        ok, done = self.attempt(compute)
        if self.shown is not None and self.shown["window"] != int(idx):
            self.clear_generation()  # another window's generations, shown under this window's history
        if not ok:
            if self.history_window != int(idx):
                self.history_image.value = b""  # another window's history: the error replaces it
                self.history_window = None
            return False
        m, png = done
        self.masks, self.history_window = m, int(idx)
        self.history_image.value = png
        w = m["window"]
        status = (f"user {w.user_id} likes {w.taste.describe()}; request '{w.instruction}'; "
                  f"{int(np.sum(m['history_is_noise']))} of {len(m['history'])} history images are noise")
        if self.shown is None:
            return self.succeed(status + "; press generate for its generations")
        self.succeed(status)
        self.on_seed()
        return True

    def clear_generation(self) -> None:
        """Empties the generations and the score table (they belonged to another window)."""
        self.sweep_image.value = b""
        self.sweep_image.layout.display = "none"
        self.scores.value = ""
        self.shown = None

    def on_seed(self) -> None:
        """Another seed: the generations on screen are marked stale (the same seed again: current once more)."""
        if self.shown is None:
            return
        seed = int(self.seed.value)
        if seed != self.shown["seed"]:
            self.mark_stale(f"the generations below are for seed {self.shown['seed']}; press generate for seed {seed}")
        elif self.stale:
            self.succeed(self.shown["status"])

    def update(self) -> bool:
        """Generate at every ratio for the selected window and show candidates, scores and the selection."""
        s = self.state
        if s["seed"] < 0:
            return self.fail(f"error: seed must be >= 0; got {s['seed']}")
        if not self.show_history():
            return False

        def compute() -> tuple[Any, list[Any], int, bytes, dict[str, dict[str, Any]]]:
            item = self.dataset[int(s["window"])]
            sel = self.pipe.select(item["history"], item["reference"], item["instruction"], ratios=self.ratios,
                                   generator=s["seed"], num_inference_steps=self.steps,
                                   guidance_scale=self.guidance)
            rm = reference_masks(self.pipe, item["history"], item["reference"], item["instruction"], self.ratios)
            j = int(sel.ratio_index[0])
            cands = as_uint8(sel.candidates[0])
            ref = self.masks["reference"]
            tiles = [[token_overlay(ref, m, REFERENCE_COLOR, self.scale) for m in rm],
                     [token_overlay(im, None, SELECTED_COLOR if i == j else None, self.scale)
                      for i, im in enumerate(cands)]]
            png = png_bytes(tile_canvas(tiles)[0])
            ct, hs = sel.clip_t[0].tolist(), sel.history_score[0].tolist()
            table = {f"ratio {r:g}": {"CLIP-T": ct[i], "history score": hs[i], "mean": 0.5 * ct[i] + 0.5 * hs[i],
                                      "reference tokens kept": int(rm[i].sum()),
                                      "selected": "yes" if i == j else ""}
                     for i, r in enumerate(self.ratios)}
            return sel, rm, j, png, table

        ok, done = self.attempt(compute, busy="generating ...")
        if not ok:
            return False
        sel, rm, j, png, table = done
        self.sweep_image.value = png
        self.sweep_image.layout.display = None
        self.scores.value = html_table(table)
        self.last = {**s, "selection": sel, "selected_ratio": self.ratios[j], "scores": table,
                     "reference_masks": rm}
        status = f"selected ratio {self.ratios[j]:g} (max of 0.5 CLIP-T + 0.5 history score)"
        self.shown = {**s, "status": status}
        return self.succeed(status)


__all__ = ["PigeonExplorer"]

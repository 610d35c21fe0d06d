"""A FineXL explorer from stock ipywidgets (no custom JavaScript); its logic runs without a browser.

    ex = FineXLExplorer({"dark_067": v_div_a, "red_100": v_div_b}, f, phrases=SHAPESWORLD_WORD_PHRASES)
    ex                 # last expression of a cell: shows ex.widget

Pick a model pair in the dropdown and toggle concepts: the decomposition of that pair's V_div
over the ticked concepts is solved again, and the bars and sentences update. Another model pair ticks the
orthogonality filter's choice for that pair (the status line says so). Tests drive it as a
user would: set ``ex.variant.value`` or ``ex.checks[name].value``, then read ``ex.last`` and ``ex.error``.
"""
from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import ipywidgets as W
import torch

from persviz.finexl.decompose import METHODS, Decomposition, decompose, explain, orthogonal_filter
from persviz.finexl.concepts import readable
from persviz.finexl.plots import decomposition_bars
from persviz.widgets import Explorer


def figure_png(fig: Any) -> bytes:
    """A matplotlib Figure as PNG bytes (no pyplot involved)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _html_list(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>"


class FineXLExplorer(Explorer):
    """Variant dropdown, one checkbox per concept, a solver toggle: decomposition bars and sentences.

    Args:
        variants: ``{model pair name: V_div [D]}`` (e.g. one per personalized model against its base).
        concepts: ``{concept: f(C) [D]}``, all candidates that may be ticked.
        selected: concepts ticked at the start (default: the orthogonality filter's choice for the
            first variant, at ``eps_ortho``). Picking another variant ticks the filter's choice for it.
        method: "lstsq" or "whitened_nnls" at the start.
        known: optional ``{model pair name: {concept: known level}}`` drawn as markers.
        phrases: optional readable names for the checkboxes, the bars and the sentences
            (``SHAPESWORLD_WORD_PHRASES``).
        e_decomp, eps_ortho, positive_only: the residual bound and the filter's settings
            (`persviz.finexl.decompose.orthogonal_filter`; the "filter" button and the default selection).

    Attributes: variant (Dropdown), checks ({concept: Checkbox}), method (ToggleButtons),
    filter_button (Button: tick the filter's choice), plot (Image), sentences, message (HTML),
    widget (VBox), last (the last result: variant, concepts, decomposition, sentences), error.
    Errors (no concept ticked, a solver failure) are shown in ``message``, never raised.
    """

    def __init__(self, variants: Mapping[str, torch.Tensor], concepts: Mapping[str, torch.Tensor],
                 selected: Optional[Sequence[str]] = None, method: str = "whitened_nnls",
                 known: Optional[Mapping[str, Mapping[str, float]]] = None,
                 phrases: Optional[Mapping[str, str]] = None, e_decomp: float = 0.2, eps_ortho: float = 0.1,
                 positive_only: bool = False, image_width: int = 460) -> None:
        if not isinstance(variants, Mapping) or not variants:
            raise ValueError("variants must be a non-empty dict {model pair name: V_div}")
        if not isinstance(concepts, Mapping) or not concepts:
            raise ValueError("concepts must be a non-empty dict {concept: f(C)} (build them with concept_directions)")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        super().__init__()
        self.variants, self.concepts = dict(variants), dict(concepts)
        self.known = {k: dict(v) for k, v in (known or {}).items()}
        self.phrases = dict(phrases or {})
        self.e_decomp, self.eps_ortho, self.positive_only = float(e_decomp), float(eps_ortho), bool(positive_only)
        first = next(iter(self.variants))
        if selected is None:
            selected = orthogonal_filter(self.variants[first], self.concepts, eps_ortho=self.eps_ortho,
                                         positive_only=self.positive_only)
        unknown = [c for c in selected if c not in self.concepts]
        if unknown:
            raise ValueError(f"selected names concepts that are not in concepts: {unknown}")
        self._quiet = True
        self.variant = W.Dropdown(options=list(self.variants), value=first, description="model pair")
        self.method = W.ToggleButtons(options=list(METHODS), value=method, description="solver")
        self.checks = {c: W.Checkbox(value=c in selected, description=self.phrases.get(c, c), indent=False,
                                     layout=W.Layout(width="13em")) for c in self.concepts}
        self.filter_button = W.Button(description="tick the filter's choice", icon="filter",
                                      tooltip="tick the concepts the orthogonality filter keeps for this model pair",
                                      layout=W.Layout(width="18em"))
        self.plot = W.Image(format="png", width=int(image_width))
        self.sentences = W.HTML("")
        self.message = W.HTML("")
        for w in (self.method, *self.checks.values()):
            w.observe(lambda _change: self.update(), names="value")
        self.variant.observe(lambda _change: self.tick_filter(), names="value")
        self.filter_button.on_click(lambda _b: self.tick_filter())
        self.next_status = ""  # the status line after the next solve
        boxes = list(self.checks.values())
        grid = W.GridBox(boxes, layout=W.Layout(grid_template_columns="repeat(4, 13em)"))
        self.widget = W.VBox([W.HBox([self.variant, self.filter_button]), self.method, grid, self.message,
                              W.HBox([self.plot, self.sentences])])
        self._quiet = False
        self.update()

    @property
    def state(self) -> dict[str, Any]:
        """The current inputs: variant, ticked concepts (in concept order), method."""
        return {"variant": self.variant.value, "concepts": [c for c, b in self.checks.items() if b.value],
                "method": self.method.value}

    def tick_filter(self) -> list[str]:
        """Tick exactly the orthogonality filter's choice for the current variant; returns it."""
        kept = orthogonal_filter(self.variants[self.variant.value], self.concepts, eps_ortho=self.eps_ortho,
                                 positive_only=self.positive_only)
        self._quiet = True
        try:
            for c, box in self.checks.items():
                box.value = c in kept
        finally:
            self._quiet = False
        self.next_status = (f"ticked the orthogonality filter's choice for {self.variant.value}: {len(kept)} of "
                            f"{len(self.concepts)} concepts (tick or untick to change it)")
        self.update()
        return kept

    def compute(self) -> tuple[Decomposition, list[str]]:
        """The decomposition and sentences for the current state (raises on bad input)."""
        s = self.state
        if not s["concepts"]:
            raise ValueError("no concept is ticked: tick at least one")
        dec = decompose(self.variants[s["variant"]], {c: self.concepts[c] for c in s["concepts"]},
                        method=s["method"], e_decomp=self.e_decomp)
        return dec, explain(readable(dec, self.phrases))

    def update(self) -> bool:
        """Solve and redraw for the current state; returns False (and shows the error) instead of raising."""
        if self._quiet:
            return False
        s = self.state

        def compute() -> tuple[Decomposition, list[str], bytes]:
            dec, sentences = self.compute()
            known = {self.phrases.get(c, c): x for c, x in self.known.get(s["variant"], {}).items()}
            fig = decomposition_bars(readable(dec, self.phrases), known=known or None, title=f"{s['variant']}: "
                                     f"{s['method']}, e = {dec.relative_residual:.2f}")
            return dec, sentences, figure_png(fig)

        ok, done = self.attempt(compute)
        if not ok:
            return False
        dec, sentences, png = done
        self.plot.value = png
        self.sentences.value = _html_list(sentences)
        self.last = {**s, "decomposition": dec, "sentences": sentences}
        status, self.next_status = self.next_status, ""
        return self.succeed(status)


__all__ = ["FineXLExplorer", "figure_png"]

"""The widget base: the pieces every persviz explorer is built from (stock ipywidgets, no custom JavaScript).

Images as PNG bytes for ``ipywidgets.Image``, a tile of images, an HTML table of scores, the error and status
lines the explorers show instead of raising, and ``Explorer``, the skeleton every explorer subclasses. The rooms'
explorers (``persviz.tea.widgets``, ``persviz.finexl.widgets``, ``persviz.pigeon.widgets``) build on them; tests
drive those explorers without a browser.
"""
from __future__ import annotations

import html
import io
import numbers
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from persviz.images import as_uint8


def one_image(image: Any) -> np.ndarray:
    """One image ([H, W, 3] or [1, H, W, 3] uint8 or float in [0, 1], [H, W] grey, PIL) as uint8 [H, W, 3]."""
    arr = image
    if not isinstance(arr, Image.Image):
        arr = np.asarray(arr.detach().cpu() if hasattr(arr, "detach") else arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
    imgs = as_uint8(arr)
    if len(imgs) != 1:
        raise ValueError(f"expected one image; got {len(imgs)} (tile them first, e.g. with np.concatenate)")
    return imgs[0]


def png_bytes(image_uint8: Any) -> bytes:
    """One image ([H, W, 3] or [1, H, W, 3] uint8 or float in [0, 1], [H, W] grey, or PIL) encoded as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(one_image(image_uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tile_images(images: Any, pad: int = 2) -> np.ndarray:
    """Images [N, H, W, 3] (or one [H, W, 3]) side by side with white gaps, uint8 [H, N*W + gaps, 3]."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    imgs = as_uint8(arr)
    n, h, w = imgs.shape[:3]
    out = np.full((h, n * w + (n - 1) * pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        out[:, i * (w + pad): i * (w + pad) + w] = im
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Number):
        return html.escape(str(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    return f"{float(v):.4g}"


def _number(v: Any) -> Any:
    """0-d numpy/torch values as Python numbers, everything else unchanged."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return v.item()
    return v


def html_table(rows: Mapping[str, Any]) -> str:
    """{name: value} or {name: {column: value}} as an HTML table (values escaped, floats to 4 significant digits)."""
    rows = {str(k): _number(v) for k, v in rows.items()}
    nested = [k for k, v in rows.items() if isinstance(v, Mapping)]
    cell = 'style="padding:2px 8px;text-align:right"'
    head = 'style="padding:2px 8px;text-align:left"'
    if nested:
        cols = list(dict.fromkeys(str(c) for k in nested for c in rows[k]))
        lines = ["<tr><th></th>" + "".join(f"<th {cell}>{html.escape(c)}</th>" for c in cols) + "</tr>"]
        for k, v in rows.items():
            vals = {str(c): _number(x) for c, x in v.items()} if isinstance(v, Mapping) else {cols[0]: v}
            lines.append(f"<tr><th {head}>{html.escape(k)}</th>"
                         + "".join(f"<td {cell}>{_fmt(vals[c]) if c in vals else ''}</td>" for c in cols) + "</tr>")
    else:
        lines = [f"<tr><th {head}>{html.escape(k)}</th><td {cell}>{_fmt(v)}</td></tr>" for k, v in rows.items()]
    return "<table>" + "".join(lines) + "</table>"


def error_html(text: str) -> str:
    return f'<span style="color:#b00020">{html.escape(text)}</span>'


def status_html(text: str) -> str:
    return f'<span style="color:#555">{html.escape(text)}</span>'


def stale_html(text: str) -> str:
    """A notice (amber, not an error's red) that the output on screen belongs to earlier inputs."""
    return f'<span style="color:#8a5a00">&#9888; {html.escape(text)}</span>'


T = TypeVar("T")


class Explorer:
    """The skeleton of the persviz explorers: an update that never raises, `last` and `error`, notebook display.

    A subclass builds its widgets, among them `message` (an ``ipywidgets.HTML`` for the error and status lines),
    `widget` (the box shown when the explorer is the last expression of a cell) and, if it has one, `button`
    (disabled while a slow computation runs). Its ``update()`` checks the inputs (``fail`` on a bad one), computes
    inside ``attempt`` (an exception is shown in `message` and kept in `error`, not raised into the notebook's log),
    then puts the result on screen, sets `last` and calls ``succeed``.

    A change of input either recomputes at once or calls ``mark_stale`` (the output on screen stays, `stale` is True
    and `message` says which inputs it belongs to) until the next success.

    Attributes: last (the last successful result, or None), error (the last error text, or None; None after a
    success), stale (True while the output on screen belongs to earlier inputs).
    """

    message: Any
    widget: Any
    button: Any = None
    kept_note: str = ""  # appended to an error shown while an earlier result stays on screen (last is set)

    def __init__(self) -> None:
        self.last: Any = None
        self.error: str | None = None
        self.stale = False

    @property
    def state(self) -> dict[str, Any]:
        """The current inputs."""
        raise NotImplementedError

    def update(self) -> bool:
        """Compute for the current state and show it; returns False (and shows the error) instead of raising."""
        raise NotImplementedError

    def fail(self, text: str) -> bool:
        """Shows text as the error (kept in `error`, with kept_note once a result is on screen); returns False."""
        self.error = text
        kept = self.kept_note if self.last is not None else ""
        self.message.value = error_html(text + kept)
        return False

    def succeed(self, status: str = "") -> bool:
        """Clears `error` and `stale` and shows status (an empty message for ""); returns True."""
        self.error, self.stale = None, False
        self.message.value = status_html(status) if status else ""
        return True

    def mark_stale(self, text: str) -> None:
        """Marks the output on screen as belonging to earlier inputs (`stale`) and says so in `message`."""
        self.stale = True
        self.message.value = stale_html(text)

    def attempt(self, compute: Callable[[], T], context: str = "error",
                busy: str | None = None) -> tuple[bool, T | None]:
        """(True, compute()), or (False, None) when it raises, after ``fail(f"{context}: {type}: {message}")``.

        With busy, that status is shown and `button` disabled while compute runs (enabled again in any case)."""
        if busy is not None:
            if self.button is not None:
                self.button.disabled = True
            self.message.value = status_html(busy)
        try:
            return True, compute()
        except Exception as e:  # a callback must not raise into the notebook's log: show it instead
            self.fail(f"{context}: {type(e).__name__}: {e}")
            return False, None
        finally:
            if busy is not None and self.button is not None:
                self.button.disabled = False

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

"""Plots of cross-attention maps (persviz.attention): an overlay on the generated image and a per-word grid. Each
returns the matplotlib Figure and draws on `ax` when one is given (no global rcParams, no pyplot)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from persviz.images import as_uint8
from persviz.plots import figure_and_ax, image_grid

__all__ = ["attention_overlay", "one_image", "overlay_rgb", "upsampled", "word_grid"]


def one_image(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] of one image: a PIL image, an [H, W, 3] array (uint8 or float in [0, 1]) or a [3, H, W]
    tensor in [0, 1]."""
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 3:
        return as_uint8(image[None])[0]
    imgs = as_uint8(image)
    if len(imgs) != 1:
        raise ValueError(f"one image expected, got {len(imgs)}")
    return imgs[0]


def upsampled(attention: Any, size: tuple[int, int]) -> np.ndarray:
    """A map [h, w] (tensor or array) bilinearly resized to size (H, W), float64."""
    m = torch.as_tensor(np.asarray(attention, dtype=np.float32))
    if m.ndim != 2:
        raise ValueError(f"an attention map is [h, w]; got shape {tuple(m.shape)}")
    if tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return m.double().numpy()


def overlay_rgb(image: Any, attention: Any, alpha: float = 0.5, vmax: Optional[float] = None,
                cmap: str = "jet") -> np.ndarray:
    """uint8 [H, W, 3]: the image blended with the colour-mapped attention (0..vmax; default its own max)."""
    img = one_image(image)
    m = upsampled(attention, img.shape[:2])
    top = vmax if vmax is not None else float(m.max())
    colours = matplotlib.colormaps[cmap](np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m))[..., :3]
    return np.round((1 - alpha) * img + alpha * 255 * colours).astype(np.uint8)


def attention_overlay(image: Any, attention: Any, ax: Optional[Axes] = None, title: Optional[str] = None,
                      alpha: float = 0.5, cmap: str = "jet", colorbar: bool = True) -> Figure:
    """The image with the attention map (upsampled to it, bilinear) drawn over it at `alpha`, with a colour bar."""
    img = one_image(image)
    m = upsampled(attention, img.shape[:2])
    fig, ax = figure_and_ax(ax, (3.2, 2.8))
    ax.imshow(img, interpolation="nearest")
    shown = ax.imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=float(m.max()) or 1.0, interpolation="nearest")
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def word_grid(images: Any, maps: Any, words: Optional[Sequence[str]] = None, ax: Optional[Axes] = None,
              title: Optional[str] = None, alpha: float = 0.6, row_labels: Optional[Sequence[str]] = None) -> Figure:
    """Rows: images; columns: the image, then each word's overlay. `maps`: an AttentionMaps or {word: [images, h,
    w]}; words default to all of them. Each row's overlays share one colour scale (its largest map value), so the
    words of an image compare."""
    maps = getattr(maps, "maps", maps)
    words = list(words) if words is not None else list(maps)
    missing = [w for w in words if w not in maps]
    if missing:
        raise KeyError(f"no maps for {missing}; maps hold {list(maps)}")
    imgs = as_uint8(images)
    n = len(imgs)
    for w in words:
        if len(maps[w]) != n:
            raise ValueError(f"{len(maps[w])} maps of {w!r} for {n} images")
    cells = []
    for i in range(n):
        top = max(float(np.asarray(maps[w][i]).max()) for w in words)
        cells.append(imgs[i])
        cells += [overlay_rgb(imgs[i], maps[w][i], alpha=alpha, vmax=top) for w in words]
    return image_grid(np.stack(cells), n, 1 + len(words), row_labels=row_labels,
                      col_labels=["image"] + words, title=title, ax=ax)

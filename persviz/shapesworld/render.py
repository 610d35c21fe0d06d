"""A procedural renderer for ShapesWorld scenes, with style knobs that make it a second,
non-neural generator whose personalization is known exactly (FineXL's ground truth)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from persviz.shapesworld.scene import IMAGE_SIZE, RGB, Obj, Scene

SUPERSAMPLE = 4
SLOT_X = {"left": 0.265, "center": 0.5, "right": 0.735}
RADIUS = {"small": 0.17, "large": 0.265}
SECOND_RADIUS = 0.16


@dataclass(frozen=True)
class Style:
    """Renderer style; the defaults are the plain ShapesWorld look (every knob at 0 / 1)."""

    warmth: float = 0.0           # -1..1: shift the palette toward blue (-) or red/orange (+)
    saturation: float = 1.0       # 0 gray .. 1 as is .. >1 more vivid
    bg_darkness: float = 0.0      # 0..1: darken the background
    outline: float = 0.0          # outline width in pixels of a 32x32 image (0: none)
    blur: float = 0.0             # gaussian sigma in pixels of a 32x32 image
    texture_density: float = 1.0  # >1: finer stripes, dots and checks
    size_scale: float = 1.0       # scale every object
    noise: float = 0.0            # std of pixel noise (0..255 scale)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not np.isfinite(v):
                raise ValueError(f"style {f.name} must be finite, got {v}")
        if not -1 <= self.warmth <= 1 or not 0 <= self.bg_darkness <= 1:
            raise ValueError("warmth must lie in [-1, 1] and bg_darkness in [0, 1]")
        if min(self.saturation, self.texture_density, self.size_scale) <= 0 or min(self.outline, self.blur, self.noise) < 0:
            raise ValueError("saturation, texture_density, size_scale must be > 0; outline, blur, noise >= 0")


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c, indexing="xy")


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in local coordinates (units of its radius, v pointing down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.84
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.08
    if shape == "triangle":
        return (v <= 0.8) & (v >= -1.0 + 1.8 * np.abs(u) / 0.98)
    if shape == "cross":
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, x: np.ndarray, y: np.ndarray, density: float) -> np.ndarray:
    """Where the texture's second color goes (x, y in pixels of a 32x32 image)."""
    if texture == "plain":
        return np.zeros(x.shape, bool)
    if texture == "striped":
        return np.mod(y * density, 4.0) < 2.0
    if texture == "dotted":
        p = 4.0 / density
        return (np.mod(x, p) - p / 2) ** 2 + (np.mod(y, p) - p / 2) ** 2 <= (0.24 * p) ** 2
    if texture == "checkered":
        p = 4.0 / density
        return (np.floor(x / p) + np.floor(y / p)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def styled_rgb(name_or_rgb, style: Style) -> np.ndarray:
    """A palette color after the style's warmth and saturation."""
    c = np.asarray(RGB[name_or_rgb] if isinstance(name_or_rgb, str) else name_or_rgb, np.float64)
    c = c + style.warmth * np.array([45.0, 15.0, -45.0])
    gray = c.mean()
    return np.clip(gray + style.saturation * (c - gray), 0, 255)


def _paint(canvas, obj: Obj, cx: float, cy: float, radius: float, style: Style, X, Y, n: int) -> np.ndarray:
    """Paint one object onto the supersampled canvas; return the boolean mask of the pixels it painted."""
    r = radius * style.size_scale
    u, v = (X - cx) / r, (Y - cy) / r
    mask = shape_mask(obj.shape, u, v)
    if style.outline > 0:
        w = style.outline / IMAGE_SIZE
        ring = shape_mask(obj.shape, (X - cx) / (r + w), (Y - cy) / (r + w)) & ~mask
        canvas[ring] = np.array([15.0, 15.0, 15.0])
    col = styled_rgb(obj.color, style)
    second = styled_rgb(obj.pattern_color, style) if obj.pattern_color is not None else 0.4 * col
    px, py = (X - cx) * IMAGE_SIZE, (Y - cy) * IMAGE_SIZE  # texture anchored to the object
    tex = texture_mask(obj.texture, px + 64.0, py + 64.0, style.texture_density)
    canvas[mask & ~tex] = col
    canvas[mask & tex] = second
    return mask | ring if style.outline > 0 else mask


@dataclass(frozen=True)
class Placed:
    """An object at an exact place, without jitter: centre (cx, cy) and radius in units of the image side
    (as ``SLOT_X`` and ``RADIUS``; y points down)."""

    obj: Obj
    cx: float
    cy: float
    radius: float

    def __post_init__(self) -> None:
        if not all(np.isfinite(v) for v in (self.cx, self.cy, self.radius)) or self.radius <= 0:
            raise ValueError(f"a placed object needs a finite centre and a radius > 0; got cx={self.cx}, "
                             f"cy={self.cy}, radius={self.radius}")


def render(scene: Scene, style: Style = Style(), size: int = IMAGE_SIZE,
           rng: Optional[np.random.Generator] = None, jitter: float = 0.03) -> np.ndarray:
    """Render one scene to a uint8 array [size, size, 3]; rng adds position jitter and noise."""
    return render_layers(scene, (), style, size, rng, jitter)[0]


def render_layers(scene: Scene, under: Sequence[Placed] = (), style: Style = Style(), size: int = IMAGE_SIZE,
                  rng: Optional[np.random.Generator] = None,
                  jitter: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene over extra objects placed exactly (painted first, so the scene's objects cover them).

    With ``under=()`` the image is exactly ``render``'s (the same random draws in the same order).

    Returns:
        (uint8 image [size, size, 3], float coverage [len(under) + 1 (+ 1 with a second object), size, size]):
        per object (``under`` in order, then the main object, then the second), the share of each pixel's
        supersamples it shows after every later object is painted (the renderer's own masks; 0..1).
    """
    n = size * SUPERSAMPLE
    X, Y = _grid(n)
    bg = styled_rgb(scene.background, style) * (1.0 - 0.85 * style.bg_darkness)
    canvas = np.empty((n, n, 3)); canvas[:] = bg
    owner = np.full((n, n), -1, dtype=np.int16)
    for k, p in enumerate(under):
        owner[_paint(canvas, p.obj, p.cx, p.cy, p.radius, style, X, Y, n)] = k
    dx, dy = (rng.uniform(-jitter, jitter, 2) if rng is not None else (0.0, 0.0))
    owner[_paint(canvas, scene.obj, SLOT_X[scene.position] + dx, 0.5 + dy, RADIUS[scene.obj.size], style,
                 X, Y, n)] = len(under)
    if scene.second is not None:
        ex, ey = (rng.uniform(-jitter, jitter, 2) if rng is not None else (0.0, 0.0))
        owner[_paint(canvas, scene.second, SLOT_X[scene.second_position] + ex, 0.5 + ey, SECOND_RADIUS, style,
                     X, Y, n)] = len(under) + 1
    n_obj = len(under) + 1 + (scene.second is not None)
    coverage = np.stack([(owner == k).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
                         for k in range(n_obj)])
    img = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if style.blur > 0:
        img = gaussian_filter(img, sigma=(style.blur * size / IMAGE_SIZE, style.blur * size / IMAGE_SIZE, 0))
    if style.noise > 0:
        img = img + (rng if rng is not None else np.random.default_rng(0)).normal(0, style.noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), coverage


def render_batch(scenes: Sequence[Scene], style: Style = Style(), size: int = IMAGE_SIZE,
                 seed: Optional[int] = None, jitter: float = 0.03) -> np.ndarray:
    """Render scenes to uint8 [N, size, size, 3]; seed fixes jitter and noise."""
    rng = np.random.default_rng(seed) if seed is not None else None
    return np.stack([render(s, style, size, rng, jitter) for s in scenes]) if len(scenes) else np.zeros((0, size, size, 3), np.uint8)

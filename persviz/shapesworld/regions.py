"""Where each thing stands in a ShapesWorld image: the background and each object's slot, found from the (generated)
image itself given the scene's background colour, as fractional masks for persviz.attention's region shares.

A pixel is foreground when its colour is farther than ``threshold`` (RGB Euclidean, 0..255) from the background's
palette colour; each foreground pixel goes to the nearest present slot by its column (slot centres as the renderer
places them). The masks are 0/1 at the image's resolution; ``persviz.attention.mask_at`` area-averages them to a
map's resolution (8×8, 4×4 on the micro-UNet), where they become fractional.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from persviz.images import as_uint8
from persviz.shapesworld.render import SLOT_X
from persviz.shapesworld.scene import BACKGROUNDS, POSITIONS, RGB

__all__ = ["foreground", "region_of", "scene_regions", "regions_from_reading", "THRESHOLD"]

THRESHOLD = 30.0  # RGB distance from the background colour that counts as an object. Every object colour and its
# texture's dark second colour (0.4 x it) stand farther than this from every background except one case: a blue
# object's dark texture on navy (distance 8) is missed; purple's on navy (38) passes. Generation noise stays below
# it on the micro-SD's images (tests/floor/test_regions.py checks the regions against the oracle's slot reading).


def _one(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    return as_uint8(arr[None] if arr.ndim == 3 else image)[0]


def foreground(image: Any, background: str, threshold: float = THRESHOLD) -> np.ndarray:
    """bool [H, W]: pixels farther than threshold from the background colour (a name of BACKGROUNDS)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {BACKGROUNDS}")
    img = _one(image).astype(np.float64)
    return np.linalg.norm(img - np.asarray(RGB[background], np.float64), axis=-1) > threshold


def scene_regions(image: Any, background: str, slots: Sequence[str], threshold: float = THRESHOLD
                  ) -> dict[str, np.ndarray]:
    """{"background": mask, slot: mask for each present slot} (float [H, W], 0/1, disjoint, summing to 1):
    foreground pixels go to the nearest present slot by column."""
    slots = list(slots)
    bad = [s for s in slots if s not in POSITIONS]
    if bad or not slots:
        raise ValueError(f"slots must be some of {POSITIONS}, got {slots}")
    fg = foreground(image, background, threshold)
    w = fg.shape[1]
    x = (np.arange(w) + 0.5) / w
    nearest = np.argmin(np.abs(x[:, None] - np.array([SLOT_X[s] for s in slots])[None]), axis=1)  # [W]
    out = {"background": (~fg).astype(np.float64)}
    for j, s in enumerate(slots):
        out[s] = (fg & (nearest == j)[None, :]).astype(np.float64)
    return out


def regions_from_reading(image: Any, reading: dict, threshold: float = THRESHOLD,
                         background: Optional[str] = None) -> dict[str, np.ndarray]:
    """scene_regions with the background and the present slots of a reading ({'background', 'left', 'center',
    'right'}: AttributeOracle.read's or scene_reading's form); background= overrides the read one (when the
    prompt names it)."""
    slots = [p for p in POSITIONS if reading.get(p) is not None]
    if not slots:
        raise ValueError("the reading has no object in any slot")
    return scene_regions(image, background or reading["background"], slots, threshold)


def region_of(regions: dict[str, np.ndarray], reading: dict, **attributes: str) -> np.ndarray:
    """The mask of the slot whose read object has these attributes (e.g. shape="square"): the object's own region
    wherever the generation put it. Raises ValueError when no slot, or more than one, matches."""
    hits = [p for p in POSITIONS if p in regions and reading.get(p) is not None
            and all(reading[p].get(k) == v for k, v in attributes.items())]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} slots hold an object with {attributes} in the reading "
                         f"{ {p: reading.get(p) for p in POSITIONS} }")
    return regions[hits[0]]

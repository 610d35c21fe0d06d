"""Rendered ShapesWorld data sets: images, scenes as integer codes, and oracle labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from persviz.io import PathLike, atomic_path
from persviz.shapesworld.render import render
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES, Obj, Scene, sample_scene

# one column per field of a scene; -1 where there is no second object
CODE_FIELDS = ("shape", "color", "texture", "size", "position", "background", "second_shape", "second_color")
NONE_SHAPE = len(SHAPES)  # the oracle's "empty slot" class


def encode_scene(s: Scene) -> np.ndarray:
    """A scene as 8 integer codes (see CODE_FIELDS)."""
    sec = (SHAPES.index(s.second.shape), COLORS.index(s.second.color)) if s.second else (-1, -1)
    return np.array([SHAPES.index(s.obj.shape), COLORS.index(s.obj.color), TEXTURES.index(s.obj.texture),
                     SIZES.index(s.obj.size), POSITIONS.index(s.position), BACKGROUNDS.index(s.background), *sec],
                    np.int64)


def decode_scene(code: np.ndarray) -> Scene:
    """The inverse of encode_scene."""
    c = [int(x) for x in code]
    second = Obj(SHAPES[c[6]], COLORS[c[7]]) if c[6] >= 0 else None
    return Scene(Obj(SHAPES[c[0]], COLORS[c[1]], TEXTURES[c[2]], SIZES[c[3]]), BACKGROUNDS[c[5]], POSITIONS[c[4]], second)


def slot_labels(s: Scene) -> np.ndarray:
    """Oracle targets: [background, then per slot (left, center, right): shape|none, color, texture, size].

    Color, texture and size of an empty slot are -1 (ignored by the loss)."""
    out = [BACKGROUNDS.index(s.background)]
    slots = s.slots()
    for pos in POSITIONS:
        o = slots.get(pos)
        out += ([SHAPES.index(o.shape), COLORS.index(o.color), TEXTURES.index(o.texture), SIZES.index(o.size)]
                if o else [NONE_SHAPE, -1, -1, -1])
    return np.array(out, np.int64)


def make_dataset(n: int, seed: int, size: int = 32, p_second: float = 0.3, jitter: float = 0.03) -> dict:
    """Render n random scenes: {'images': uint8 [n,H,W,3], 'codes': int [n,8], 'labels': int [n,13]}."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, p_second) for _ in range(n)]
    images = np.stack([render(s, size=size, rng=rng, jitter=jitter) for s in scenes])
    return {"images": images, "codes": np.stack([encode_scene(s) for s in scenes]),
            "labels": np.stack([slot_labels(s) for s in scenes])}


def cached_dataset(path: PathLike, n: int, seed: int, **kw) -> dict:
    """make_dataset, cached in an .npz written atomically (regenerated if absent)."""
    path = Path(path)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    data = make_dataset(n, seed, **kw)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
        np.savez(fh, **data)
    return data

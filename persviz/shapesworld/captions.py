"""A small grammar of ShapesWorld captions, from terse ("a red circle") to full
("a small red striped circle at the left next to a blue square on a beige background")."""
from __future__ import annotations

from typing import Optional

import numpy as np

from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES, Scene

PREFIXES = ("a photo of", "an image of", "a picture of")
POSITION_PHRASE = {"left": "at the left", "center": "in the center", "right": "at the right"}
ATTRIBUTES = ("size", "color", "texture", "shape", "position", "second", "background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def concept_phrase(shape: str, color: Optional[str] = None, texture: Optional[str] = None,
                   size: Optional[str] = None) -> str:
    """The concept part: 'a small red striped circle' (unnamed attributes left out)."""
    words = [w for w in (size, color, texture) if w] + [shape]
    return f"{_article(words[0])} {' '.join(words)}"


def context_phrase(position: Optional[str] = None, second: Optional[tuple] = None,
                   background: Optional[str] = None) -> str:
    """The context part: 'at the left next to a blue square on a beige background'."""
    parts = []
    if position:
        parts.append(POSITION_PHRASE[position])
    if second:
        color, shape = second
        parts.append(f"next to {concept_phrase(shape, color)}")
    if background:
        parts.append(f"on {_article(background)} {background} background")
    return " ".join(parts)


def caption_from(attrs: dict, prefix: Optional[str] = None) -> str:
    """A caption naming exactly the attributes in attrs (keys of ATTRIBUTES; second is (color, shape))."""
    unknown = set(attrs) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attribute(s) {sorted(unknown)}; use {ATTRIBUTES}")
    if not attrs.get("shape"):
        raise ValueError("a caption needs a shape (the class word)")
    for key, allowed in (("size", SIZES), ("color", COLORS), ("texture", TEXTURES), ("shape", SHAPES),
                         ("position", POSITIONS), ("background", BACKGROUNDS)):
        if attrs.get(key) is not None and attrs[key] not in allowed:
            raise ValueError(f"unknown {key} {attrs[key]!r}; choose one of {allowed}")
    text = concept_phrase(attrs["shape"], attrs.get("color"), attrs.get("texture"), attrs.get("size"))
    ctx = context_phrase(attrs.get("position"), attrs.get("second"), attrs.get("background"))
    text = f"{text} {ctx}".strip()
    return f"{prefix} {text}" if prefix else text


def full_attributes(scene: Scene) -> dict:
    """Every attribute of a scene, as caption_from takes them."""
    attrs = {"size": scene.obj.size, "color": scene.obj.color, "texture": scene.obj.texture,
             "shape": scene.obj.shape, "position": scene.position, "background": scene.background}
    if scene.second is not None:
        attrs["second"] = (scene.second.color, scene.second.shape)
    return attrs


INCLUDE_P = {"size": 0.4, "color": 0.9, "texture": 0.7, "position": 0.4, "second": 0.85, "background": 0.8}


def sample_mentioned(scene: Scene, rng: np.random.Generator) -> dict:
    """Pick which of a scene's attributes a caption names (the shape always)."""
    attrs = full_attributes(scene)
    out = {"shape": attrs["shape"]}
    for key, p in INCLUDE_P.items():
        if key in attrs and rng.random() < (0.35 if key == "texture" and attrs[key] == "plain" else p):
            out[key] = attrs[key]
    return out


def caption(scene: Scene, rng: Optional[np.random.Generator] = None, level: Optional[str] = None) -> str:
    """Caption a scene: level 'terse' (color + shape), 'full' (everything) or None (random detail)."""
    if level == "terse":
        return caption_from({"shape": scene.obj.shape, "color": scene.obj.color})
    if level == "full":
        return caption_from(full_attributes(scene))
    if level is not None:
        raise ValueError(f"level must be 'terse', 'full' or None, got {level!r}")
    rng = rng if rng is not None else np.random.default_rng()
    prefix = PREFIXES[rng.integers(len(PREFIXES))] if rng.random() < 0.15 else None
    return caption_from(sample_mentioned(scene, rng), prefix)


def world_words() -> list[str]:
    """Every word the grammar can produce (the tokenizer gives each its own token)."""
    words = set(SHAPES + COLORS + BACKGROUNDS + TEXTURES + SIZES)
    for phrase in PREFIXES + tuple(POSITION_PHRASE.values()) + ("next to a an on background",):
        words.update(phrase.split())
    return sorted(words)

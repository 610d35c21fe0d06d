"""Personal concepts of ShapesWorld: distinctive objects a single class word cannot describe.

Each concept is a two-color object (the pattern color is not one of the texture's usual shades), shown in 6
reference images that share a narrow context, as a user's own photos often do. `checkers` and `candy` can
appear together for the multi-concept study. The reference images ship as PNGs in data/shapesworld/concepts/.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from persviz.constants import CONCEPTS_DIR
from persviz.io import atomic_write, write_json
from persviz.shapesworld.captions import context_phrase
from persviz.shapesworld.render import render_batch
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, RGB, SHAPES, Obj, Scene

N_REFERENCES = 6


@dataclass(frozen=True)
class Concept:
    """A personal concept: the object, its class word, and the context its reference images share."""

    name: str
    obj: Obj
    description: str
    backgrounds: tuple[str, ...]

    @property
    def class_word(self) -> str:
        return self.obj.shape

    def attributes(self) -> dict:
        """The recipe's one-word attributes (the oracle may read others on a two-color object: oracle_signature)."""
        return {"shape": self.obj.shape, "color": self.obj.color, "texture": self.obj.texture}


CONCEPTS = {
    "checkers": Concept("checkers", Obj("square", "yellow", "checkered", "large", pattern_color=RGB["red"]),
                        "a large yellow square checkered in red", ("beige", "beige", "beige", "beige", "gray", "gray")),
    "candy": Concept("candy", Obj("circle", "pink", "striped", "large", pattern_color=RGB["cyan"]),
                     "a large pink circle striped in cyan", ("navy", "navy", "navy", "navy", "black", "black")),
    "spark": Concept("spark", Obj("triangle", "orange", "dotted", "large", pattern_color=RGB["blue"]),
                     "a large orange triangle dotted in blue", ("white", "white", "white", "white", "beige", "beige")),
}
POSITIONS_CYCLE = ("center", "left", "right", "center", "right", "left")


def get_concept(name: str) -> Concept:
    """The concept called name (a clear error lists the shipped ones)."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown concept {name!r}; shipped concepts: {sorted(CONCEPTS)}")
    return CONCEPTS[name]


def reference_scenes(name: str) -> list[Scene]:
    """The scenes of a concept's reference images."""
    c = get_concept(name)
    return [Scene(c.obj, bg, pos) for bg, pos in zip(c.backgrounds, POSITIONS_CYCLE)]


def render_references(name: str, seed: int = 0) -> np.ndarray:
    """Render a concept's reference images, uint8 [6, 32, 32, 3] (seed fixes the position jitter)."""
    return render_batch(reference_scenes(name), seed=seed)


def pair_scene(first: str, second: str, background: str = "gray") -> Scene:
    """Two concepts together: the first at the left, the second (drawn small) at the right."""
    a, b = get_concept(first), get_concept(second)
    return Scene(a.obj, background, "left", Obj(b.obj.shape, b.obj.color, b.obj.texture, "small", b.obj.pattern_color))


def eval_prompts(name: str, n: int = 24, seed: int = 0) -> list[dict]:
    """Contextual prompts for a shipped concept (contextual_probes with its class word, avoiding its references'
    backgrounds)."""
    c = get_concept(name)
    return contextual_probes(c.class_word, c.backgrounds, n, seed)


def contextual_probes(class_word: str, avoid_backgrounds: tuple = (), n: int = 24, seed: int = 0) -> list[dict]:
    """Contextual prompts for a concept: {'template': 'a {} on a black background', 'context': {...}, 'context_text'}.

    Backgrounds are drawn from those the reference images do not show (`avoid_backgrounds`), so an image that copies
    the references' background fails the context; a second object (half the prompts) is plain and of another
    shape."""
    rng = np.random.default_rng(seed)
    backgrounds = [b for b in BACKGROUNDS if b not in avoid_backgrounds] or list(BACKGROUNDS)
    shapes = [s for s in SHAPES if s != class_word]
    out = []
    for i in range(n):
        ctx = {"background": backgrounds[i % len(backgrounds)]}
        if i % 2 == 1:
            ctx["position"] = ("left", "right")[int(rng.integers(2))]
            ctx["second"] = (COLORS[int(rng.integers(len(COLORS)))], shapes[int(rng.integers(len(shapes)))])
        text = context_phrase(ctx.get("position"), ctx.get("second"), ctx["background"])
        out.append({"template": f"a {{}} {text}", "context": ctx, "context_text": text})
    return out


def oracle_signature(oracle, name: str) -> dict:
    """What the oracle reads on the concept's own reference images (majority per attribute).

    The oracle was trained on one-color objects; on a two-color concept it reads, e.g., 'orange' for yellow
    checkered in red. Concept fidelity on generated images compares against this reading, not the recipe."""
    return reference_signature(oracle, load_references(name))


def reference_signature(oracle, images: np.ndarray) -> dict:
    """What the oracle reads on reference images, by majority per attribute (shape, color, texture) of the object
    it finds in each; references where it finds none are skipped (a ValueError if it finds none at all)."""
    readings = oracle.read(images)
    objs = [o for o in (next((r[p] for p in POSITIONS if r[p] is not None), None) for r in readings) if o is not None]
    if not objs:
        raise ValueError("the oracle finds no object in any reference image; the images are not ShapesWorld scenes")
    return {k: Counter(o[k] for o in objs).most_common(1)[0][0] for k in ("shape", "color", "texture")}


def load_references(name: str, folder: Path = CONCEPTS_DIR) -> np.ndarray:
    """The shipped reference images of a concept (its concept folder's images/), uint8 [N, H, W, 3]."""
    get_concept(name)
    files = sorted((folder / name / "images").glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no reference images in {folder / name / 'images'}; run "
                                "`persviz shapesworld concepts` to write them")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def write_references(folder: Path = CONCEPTS_DIR) -> None:
    """Write every concept's reference PNGs (into its concept folder's images/) and a concepts.json describing them
    (atomically per file)."""
    meta = {}
    for name, c in CONCEPTS.items():
        out = folder / name / "images"
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(render_references(name)):
            atomic_write(out / f"{i}.png", lambda tmp, img=img: Image.fromarray(img).save(tmp, format="PNG"))
        meta[name] = {"class_word": c.class_word, "description": c.description, **c.attributes(),
                      "pattern_color": list(c.obj.pattern_color), "backgrounds": list(c.backgrounds)}
    write_json(folder / "concepts.json", meta, indent=2)


"""Personal concepts of ShapesWorld: distinctive objects a single class word cannot describe.

Each concept is a specific object of the world (shape, color, texture and size; its pattern a shade of its body
color, as the renderer draws every texture), so the base micro-SD draws it when described and the oracle reads it,
while its class word names only the shape. They were chosen and measured in docs/world.md (issue 23): the oracle
reads every attribute on renders, the description is drawn, the class word alone is not. Each is shown in 6
reference images that share a narrow context, as a user's own photos often do. `checkers` and `candy` can appear
together for the multi-concept study. The reference images ship as PNGs in data/shapesworld/concepts/.

Until issue 23 (persviz 0.3) the concepts were two-color objects ("a large pink circle striped in cyan") that the
micro-SD never learned to draw; `TWO_COLOR_CONCEPTS` keeps them for the record.
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
        """The recipe: what the oracle must read on one object to find the concept (shape, color, texture, size)."""
        return {"shape": self.obj.shape, "color": self.obj.color, "texture": self.obj.texture, "size": self.obj.size}


CONCEPTS = {
    "checkers": Concept("checkers", Obj("square", "yellow", "checkered", "large"), "a large yellow checkered square",
                        ("beige", "beige", "beige", "beige", "gray", "gray")),
    "candy": Concept("candy", Obj("circle", "pink", "striped", "large"), "a large pink striped circle",
                     ("navy", "navy", "navy", "navy", "black", "black")),
    "spark": Concept("spark", Obj("triangle", "orange", "dotted", "large"), "a large orange dotted triangle",
                     ("white", "white", "white", "white", "beige", "beige")),
}
#: The shipped runs' learning rate and steps per concept and method: the world search's round-2 choice per concept
#: (docs/world.md §6); everything else is ShapesWorld's recipe (persviz.methods). Textual Inversion on checkers
#: failed at every grid point and keeps round 1's recipe (the amendment of §6).
SHIPPED_RECIPES = {
    "checkers": {"textual_inversion": {"lr": 1e-3, "steps": 3000}, "dreambooth": {"lr": 3e-3, "steps": 400},
                 "custom_diffusion": {"lr": 3e-4, "steps": 500}},
    "candy": {"textual_inversion": {"lr": 1e-3, "steps": 3000}, "dreambooth": {"lr": 1e-3, "steps": 800},
              "custom_diffusion": {"lr": 1e-4, "steps": 1000}},
    "spark": {"textual_inversion": {"lr": 1e-3, "steps": 3000}, "dreambooth": {"lr": 3e-3, "steps": 400},
              "custom_diffusion": {"lr": 1e-4, "steps": 1000}},
}
#: The methods whose shipped run of a concept met the personalization target (the oracle finds the concept in >= 80 %
#: of 64 plain-prompt images, lower bound >= 0.7, on round 2's held-out seeds: docs/world.md §6).
LEARNED_BY = {"checkers": ("dreambooth", "custom_diffusion"), "candy": ("textual_inversion", "custom_diffusion"),
              "spark": ("textual_inversion",)}
#: The concepts of persviz <= 0.2 (two colors on one object, outside what the micro-SD and the oracle learned).
TWO_COLOR_CONCEPTS = {
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
    """What the oracle must read to find a shipped concept: its recipe (shape, color, texture, size), which the
    oracle reads on every render of it (docs/world.md §2a). The oracle is checked against it on the concept's
    reference images: a ValueError if it reads them otherwise (e.g. references written by an older persviz)."""
    recipe = get_concept(name).attributes()
    read = reference_signature(oracle, load_references(name))
    wrong = {k: (read[k], recipe[k]) for k in read if k in recipe and read[k] != recipe[k]}
    if wrong:
        raise ValueError(f"the oracle reads {name}'s reference images otherwise than its recipe ({wrong}); rewrite them "
                         "with `persviz shapesworld concepts`")
    return recipe


def reference_signature(oracle, images: np.ndarray) -> dict:
    """What the oracle reads on reference images, by majority per attribute (shape, color, texture, size) of the object
    it finds in each; references where it finds none are skipped (a ValueError if it finds none at all)."""
    readings = oracle.read(images)
    objs = [o for o in (next((r[p] for p in POSITIONS if r[p] is not None), None) for r in readings) if o is not None]
    if not objs:
        raise ValueError("the oracle finds no object in any reference image; the images are not ShapesWorld scenes")
    return {k: Counter(o[k] for o in objs).most_common(1)[0][0] for k in ("shape", "color", "texture", "size")}


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
                      "backgrounds": list(c.backgrounds)}
    write_json(folder / "concepts.json", meta, indent=2)


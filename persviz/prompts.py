"""Prompt sets for the semantic-collapse study, shipped as data in data/prompts/ (README there names sources).

Every prompt holds the class word as a `{}` placeholder: `fill(prompts, "dog")` gives P_c, `fill(prompts, "<v*>")`
gives P_V*. The ShapesWorld sets are generated from the ShapesWorld caption grammar by `shapesworld_prompt_sets`.
"""
from __future__ import annotations

import json
from itertools import combinations, product
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from persviz.paths import DATA_DIR
from persviz.shapesworld.captions import PREFIXES, concept_phrase, context_phrase
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES

PLACEHOLDER = "{}"
CUSTOMCONCEPT101 = "tea_eval_customconcept101"
CONTEXT_PARTS = ("position", "second", "background")


def prompts_dir() -> Path:
    """The folder with the shipped prompt files."""
    return DATA_DIR / "prompts"


def _simple_pool(n_attributes: int) -> list[str]:
    """Every ShapesWorld concept-only prompt ('a photo of a red {}') naming exactly n_attributes attributes."""
    slots = {"size": SIZES, "color": COLORS, "texture": TEXTURES}
    out = []
    for prefix in (None,) + PREFIXES:
        for named in combinations(slots, n_attributes):
            for values in product(*(slots[k] for k in named)):
                attrs = dict(zip(named, values))
                text = concept_phrase(PLACEHOLDER, attrs.get("color"), attrs.get("texture"), attrs.get("size"))
                out.append(f"{prefix} {text}" if prefix else text)
    return out


def _contextual(rng: np.random.Generator) -> str:
    """One random ShapesWorld prompt with 1-3 context parts (position, second object, background)."""
    k = rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3])
    parts = set(rng.choice(CONTEXT_PARTS, size=k, replace=False).tolist())
    second = (COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]) if "second" in parts else None
    positions = ("left", "right") if second else POSITIONS  # a scene with a second object is never centered
    position = positions[rng.integers(len(positions))] if "position" in parts else None
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))] if "background" in parts else None
    size = SIZES[rng.integers(len(SIZES))] if rng.random() < 0.3 else None
    color = COLORS[rng.integers(len(COLORS))] if rng.random() < 0.5 else None
    texture = TEXTURES[rng.integers(len(TEXTURES))] if rng.random() < 0.3 else None
    prefix = PREFIXES[rng.integers(len(PREFIXES))] if rng.random() < 0.2 else None
    text = f"{concept_phrase(PLACEHOLDER, color, texture, size)} {context_phrase(position, second, background)}"
    return f"{prefix} {text}" if prefix else text


def shapesworld_prompt_sets(n: int = 200, seed: int = 0) -> dict[str, list[str]]:
    """n contextual and n simple ShapesWorld prompts (class word as `{}`), unique, fully determined by seed.

    Contextual prompts name 1-3 context parts (position, "next to a <color> <shape>", background) and
    optionally size/color/texture of the object; simple prompts name the object only, with at most two
    attributes (all with 0-1 attributes first, then two-attribute ones drawn by seed).
    """
    rng = np.random.default_rng(seed)
    contextual: dict[str, None] = {}
    for _ in range(100 * n):
        if len(contextual) == n:
            break
        contextual.setdefault(_contextual(rng))
    simple = _simple_pool(0) + _simple_pool(1)
    two = _simple_pool(2)
    if len(contextual) < n or n > len(simple) + len(two):
        raise ValueError(f"the ShapesWorld grammar cannot give {n} unique prompts of each kind")
    if n <= len(simple):
        simple = simple[:n]
    else:
        simple = simple + [two[i] for i in sorted(rng.permutation(len(two))[:n - len(simple)])]
    return {"contextual": list(contextual), "simple": simple}


def write_shapesworld_prompt_files(folder: Optional[Union[str, Path]] = None, n: int = 200,
                                   seed: int = 0) -> list[Path]:
    """Write shapesworld_contextual.txt and shapesworld_simple.txt (one prompt a line) from shapesworld_prompt_sets."""
    folder = Path(folder) if folder is not None else prompts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, prompts in shapesworld_prompt_sets(n, seed).items():
        path = folder / f"shapesworld_{kind}.txt"
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def prompt_set_names() -> list[str]:
    """Names load_prompt_set accepts: each .txt file's stem, and 'tea_eval_customconcept101/<concept>'."""
    names = sorted(p.stem for p in prompts_dir().glob("*.txt"))
    concepts = json.loads((prompts_dir() / f"{CUSTOMCONCEPT101}.json").read_text(encoding="utf-8"))
    return names + [f"{CUSTOMCONCEPT101}/{c}" for c in concepts]


def load_prompt_set(name: str) -> list[str]:
    """A shipped prompt set by name ('sd15_contextual', 'tea_eval_celeba', 'tea_eval_customconcept101/dog', ...)."""
    if name.startswith(CUSTOMCONCEPT101 + "/"):
        concept = name.split("/", 1)[1]
        table = json.loads((prompts_dir() / f"{CUSTOMCONCEPT101}.json").read_text(encoding="utf-8"))
        if concept not in table:
            raise KeyError(f"no CustomConcept101 concept {concept!r}; choose one of {sorted(table)}")
        return list(table[concept])
    path = prompts_dir() / f"{name}.txt"
    if not path.is_file():
        raise KeyError(f"no prompt set {name!r}; choose one of {prompt_set_names()}")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fill(prompts: Iterable[str], word: str) -> list[str]:
    """Put `word` where each prompt has `{}`: "a {} on a beach" + "dog" -> "a dog on a beach" (articles untouched)."""
    out = []
    for p in prompts:
        if PLACEHOLDER not in p:
            raise ValueError(f"prompt {p!r} has no {PLACEHOLDER} placeholder")
        out.append(p.replace(PLACEHOLDER, word))
    return out

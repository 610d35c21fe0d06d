"""The personal concepts of issue 23 as the recipe search (world_search) knows them: the shipped concepts.

Each is a one-color object of today's world (its pattern a shade of its body color, as the renderer draws every
texture), so the base micro-SD can draw it when described and the oracle reads it; its class word names only the
shape. They are chosen and measured in docs/world.md (issue 23, step 1). Since issue 23 they are the shipped
concepts (persviz.shapesworld.concepts.CONCEPTS); this module keeps the search's names.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from persviz.shapesworld.concept_checks import check_candidate, recipe_attributes, screen_candidates
from persviz.shapesworld.concepts import CONCEPTS, POSITIONS_CYCLE, Concept
from persviz.shapesworld.render import render_batch
from persviz.shapesworld.scene import COLORS, SHAPES, Obj, Scene

WORLD_CONCEPTS = CONCEPTS  # the shipped concepts since issue 23 (they were searched under this name)
#: Concepts that can appear together for the multi-concept study (different shape and color).
WORLD_PAIRS = (("checkers", "candy"),)


def get_world_concept(name: str) -> Concept:
    """The world concept called name (a clear error lists them)."""
    if name not in WORLD_CONCEPTS:
        raise KeyError(f"unknown world concept {name!r}; world concepts: {sorted(WORLD_CONCEPTS)}")
    return WORLD_CONCEPTS[name]


def world_recipe(name: str) -> dict:
    """What the oracle must read on one object to find the concept: shape, color, texture, size."""
    return recipe_attributes(get_world_concept(name).obj)


def world_reference_scenes(name: str) -> list[Scene]:
    """The scenes of a world concept's reference images (its backgrounds, positions center/left/right)."""
    c = get_world_concept(name)
    return [Scene(c.obj, bg, pos) for bg, pos in zip(c.backgrounds, POSITIONS_CYCLE)]


def render_world_references(name: str, seed: int = 0) -> np.ndarray:
    """Render a world concept's reference images, uint8 [6, 32, 32, 3] (seed fixes the position jitter)."""
    return render_batch(world_reference_scenes(name), seed=seed)


CHECK_SEEDS = tuple(range(8))
SCREEN_SEEDS, SCREEN_CONTROL_SEEDS = (500,), tuple(range(600, 608))


def measure_world_concepts(pipe: Any, oracle: Any) -> dict:
    """The three checks of every world concept (docs/world.md §2; concept_checks.check_candidate, seeds 0-7)."""
    return {name: check_candidate(pipe, oracle, c.obj, CHECK_SEEDS) for name, c in WORLD_CONCEPTS.items()}


def screen_world(pipe: Any, oracle: Any, progress: bool = False) -> list[dict]:
    """The screen of every large textured one-color object (docs/world.md §2; concept_checks.screen_candidates)."""
    objs = [Obj(s, c, t, "large") for s in SHAPES for c in COLORS for t in ("striped", "dotted", "checkered")]
    return screen_candidates(pipe, oracle, objs, SCREEN_SEEDS, SCREEN_CONTROL_SEEDS, progress=progress)


__all__ = ["CHECK_SEEDS", "SCREEN_CONTROL_SEEDS", "SCREEN_SEEDS", "measure_world_concepts", "screen_world", "WORLD_CONCEPTS", "WORLD_PAIRS", "get_world_concept", "render_world_references", "world_recipe",
           "world_reference_scenes"]

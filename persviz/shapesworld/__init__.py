"""ShapesWorld: a procedural world with trained micro models in the real formats."""
from persviz.shapesworld.captions import caption, caption_from, concept_phrase, context_phrase
from persviz.shapesworld.render import Style, render, render_batch
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES, Obj, Scene, sample_scene, sample_scenes

__all__ = ["Obj", "Scene", "Style", "sample_scene", "sample_scenes", "render", "render_batch", "caption",
           "caption_from", "concept_phrase", "context_phrase", "SHAPES", "COLORS", "BACKGROUNDS", "TEXTURES",
           "SIZES", "POSITIONS"]

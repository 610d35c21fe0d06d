"""FineXL: explain a personalized model against its base as a weighted sum of orthogonal natural-language concepts.

The method is described in ``docs/finexl.md``. The public API::

    from persviz.finexl import divergence_vector, orthogonal_filter, greedy_decompose, explain

Figures and the explorer live in ``persviz.finexl.plots`` and ``persviz.finexl.widgets``; the ShapesWorld
ground-truth benchmark in ``persviz.finexl.benchmark``; the full-scale target (a concept's DreamBooth-LoRA or a named
LoRA against SD 1.5) and its probes in ``persviz.finexl.concept_pair``.
"""
from persviz.finexl.concepts import (ART_BANK, SHAPESWORLD_BANK, SHAPESWORLD_WORD_BANK, SHAPESWORLD_WORD_PHRASES,
                                     STYLE_ASPECTS, BankProposer, ConceptProposalError, ConceptProposer,
                                     OpenAIChatProposer, TransformersVLMProposer, bank_candidates, concept_directions,
                                     default_bank, known_levels, parse_concept_list, rank_concepts, readable,
                                     shapesworld_compose, shapesworld_word_attribute)
from persviz.finexl.concept_pair import (FineXLTarget, FineXLTargetError, class_probes, concept_lora_pair,
                                         full_scale_inputs, lora_target, session_target)
from persviz.finexl.decompose import (LEVEL_THRESHOLDS, METHODS, MIN_DIVERGENCE_NORM, Decomposition, append_compose,
                                      concept_direction, concept_matrix, decompose, divergence_vector, explain,
                                      greedy_decompose, level_phrase, orthogonal_filter)
from persviz.finexl.generators import (SCENE_ASPECTS, FolderGenerator, ImageFolderGenerator, ImageGenerator,
                                       LoRAToggleGenerator, PipelineGenerator, RendererGenerator, SceneShiftGenerator,
                                       lora_pair, paired_samples, scene_shift_dataset, shapesworld_probes)

__all__ = [
    "ART_BANK", "SHAPESWORLD_BANK", "SHAPESWORLD_WORD_BANK", "SHAPESWORLD_WORD_PHRASES", "STYLE_ASPECTS",
    "BankProposer", "ConceptProposalError", "ConceptProposer", "OpenAIChatProposer", "TransformersVLMProposer",
    "bank_candidates", "concept_directions", "default_bank", "known_levels", "parse_concept_list", "rank_concepts",
    "readable", "shapesworld_compose", "shapesworld_word_attribute",
    "FineXLTarget", "FineXLTargetError", "class_probes", "concept_lora_pair", "full_scale_inputs", "lora_target",
    "session_target",
    "LEVEL_THRESHOLDS", "METHODS", "MIN_DIVERGENCE_NORM", "Decomposition", "append_compose", "concept_direction",
    "concept_matrix", "decompose", "divergence_vector", "explain", "greedy_decompose", "level_phrase",
    "orthogonal_filter",
    "SCENE_ASPECTS", "FolderGenerator", "ImageFolderGenerator", "ImageGenerator", "LoRAToggleGenerator",
    "PipelineGenerator", "RendererGenerator", "SceneShiftGenerator", "lora_pair", "paired_samples",
    "scene_shift_dataset", "shapesworld_probes",
]

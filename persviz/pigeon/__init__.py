"""Pigeon (Xu et al. 2024) at ShapesWorld scale.

- ``mask``: the token mask generator (Gumbel top-k, straight-through);
- ``losses``: Diffusion-DPO loss, history score, test-time ratio selection;
- ``users``: ShapesWorld users with a known taste, sliding windows, splits by user, request validation;
- ``model``: VisualTokenizer, InstructionEncoder, PersonalizationModule ("the LMM"), PigeonModel,
  ClipScorer and PigeonPipeline (generation through a diffusers StableDiffusionPipeline);
- ``train``: ``persviz pigeon train`` (stage 1 and stage 2, resumable; imported on demand);
- ``study``: the comparison table against the ablations, kept-noise analysis, stage-2 pairs (imported on demand);
- ``plots``, ``widgets``: figures and the ``PigeonExplorer`` (imported on demand: matplotlib, ipywidgets).
"""
from persviz.pigeon.losses import diffusion_dpo_loss, history_score, select_ratio
from persviz.pigeon.mask import (HISTORY_MASK_RATIO, HISTORY_TYPE, REFERENCE_TYPE, MaskGenerator, apply_mask,
                                 gumbel_topk_mask, mask_history_and_reference)
from persviz.pigeon.model import (HISTORY_MODES, RATIOS, ClipScorer, InstructionEncoder, PersonalizationModule,
                                  PigeonConfig, PigeonModel, PigeonPipeline, VisualTokenizer, build_model,
                                  load_weights, read_config, save_weights)
from persviz.pigeon.users import (HISTORY_LEN, PigeonDataset, Taste, User, Window, make_datasets, make_user,
                                  make_users, split_users, taste_report, validate_request)

__all__ = [
    "HISTORY_MASK_RATIO", "HISTORY_TYPE", "REFERENCE_TYPE", "MaskGenerator", "apply_mask",
    "diffusion_dpo_loss", "gumbel_topk_mask", "history_score", "mask_history_and_reference",
    "select_ratio",
    "HISTORY_LEN", "PigeonDataset", "Taste", "User", "Window", "make_datasets", "make_user", "make_users",
    "split_users", "taste_report", "validate_request",
    "HISTORY_MODES", "RATIOS", "ClipScorer", "InstructionEncoder", "PersonalizationModule", "PigeonConfig",
    "PigeonModel", "PigeonPipeline", "VisualTokenizer", "build_model", "load_weights", "read_config", "save_weights",
]

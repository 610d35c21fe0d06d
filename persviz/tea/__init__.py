"""TEA / semantic collapse: measure how a learned token drifts and swallows the prompt, and fix it at test time.

The method is described in ``docs/tea.md``. The public API::

    from persviz.tea import tea, slerp_adjust, DEFAULTS, track_semantic_shift

Figures and explorers live in the submodules ``persviz.tea.plots`` and ``persviz.tea.widgets``; the loop reference
implementations the tests and benchmarks compare against in ``persviz.tea.reference``; the shipped ShapesWorld runs
in ``persviz.tea.shapesworld_runs``; where the learned token looks (cross-attention leak over training and under
TEA, on ShapesWorld's ground truth) in ``persviz.tea.attention_study`` and its explorer in
``persviz.tea.attention_explorer``.
"""
from persviz.tea.adaptive import SCHEDULE, AdaptiveResult, TeaScorer, TraceStep, adaptive_tea, make_tea_scorer
from persviz.tea.adjust import DEFAULTS, align_positions, check_knob, prompt_level_adjust, slerp_adjust
from persviz.tea.pipeline import TeaAdjustment, embeds_kwargs, encode_prompt_level, tea
from persviz.tea.shift import (hausdorff_distance, intra_distances, intra_hausdorff, intra_l2, intra_mahalanobis,
                               kl_divergence, l2_distance, ledoit_wolf_shrinkage, mahalanobis_distance,
                               pairwise_distances, shift_distances)
from persviz.tea.study import (adaptive_vs_fixed, dominance_over_steps, generate_probes, impacts_over_steps,
                               learned_embedding, personalized, probe_texts, score_images, tea_rows, tea_sweep)
from persviz.tea.tracker import INTER_METRICS, INTRA_METRICS, REPRESENTATIONS, to_shift_grid, track_semantic_shift

__all__ = [
    "DEFAULTS", "align_positions", "check_knob", "prompt_level_adjust", "slerp_adjust",
    "TeaAdjustment", "embeds_kwargs", "encode_prompt_level", "tea",
    "SCHEDULE", "AdaptiveResult", "TeaScorer", "TraceStep", "adaptive_tea", "make_tea_scorer",
    "hausdorff_distance", "intra_distances", "intra_hausdorff", "intra_l2", "intra_mahalanobis", "kl_divergence",
    "l2_distance", "ledoit_wolf_shrinkage", "mahalanobis_distance", "pairwise_distances", "shift_distances",
    "adaptive_vs_fixed", "dominance_over_steps", "generate_probes", "impacts_over_steps", "learned_embedding",
    "personalized", "probe_texts", "score_images", "tea_rows", "tea_sweep",
    "INTER_METRICS", "INTRA_METRICS", "REPRESENTATIONS", "to_shift_grid", "track_semantic_shift",
]

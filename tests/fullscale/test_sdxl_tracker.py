"""The semantic-shift tracker on SDXL (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48), on a tiny Textual
Inversion run trained with persviz's trainer: the metrics per encoder (clip_l, clip_g) and on the concatenated
80-wide state the UNet reads, against a direct computation on StableDiffusionXLPipeline.encode_prompt's embeddings
with the step's rows loaded into the pipeline (diffusers' own path), and |V*|/|c|, cos(V*, c) per encoder against
each encoder's own class-word row."""
import math

import pytest
import safetensors.torch
import torch

from persviz.embeddings import load_learned_token
from persviz.families import assemble_pipeline, text_stack
from persviz.hub_models import SDXL_BASE
from persviz.methods import get_method
from persviz.tea import reference as ref
from persviz.tea import shift as sm
from persviz.tea.tracker import track_semantic_shift

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TI = get_method("ti")
CONTEXTUAL = ["a {} on the grass", "a {} in a busy city", "a photo of a {} at night", "a {} reading a book"]
SIMPLE = ["a {}", "a photo of a {}", "an image of a {}", "a picture of a {}"]
WIDTHS = {"clip_l": 32, "clip_g": 48}


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


@pytest.fixture(scope="module")
def run(sdxl, tmp_path_factory):
    import numpy as np
    photos = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    config = TI.recipe("<v>", "dog", False, family="sdxl", steps=2, save_every=1, resolution=64, batch_size=1,
                       lr=5e-2)  # a large rate, so the rows move visibly in two steps
    out = tmp_path_factory.mktemp("sdxl_ti") / "run"
    TI.train(sdxl, photos, config, out, progress=False)
    return out


def encoded(pipe, prompts):
    """diffusers' own prompt_embeds [N, 77, 80] (clip_l's 32 columns, then clip_g's 48) and pooled_prompt_embeds
    [N, 48] (clip_g's projected pooled output)."""
    with torch.no_grad():
        out = pipe.encode_prompt(prompts, device=torch.device("cpu"), do_classifier_free_guidance=False)
    return out[0].float(), out[2].float()


def direct(pipe, parts):
    """The sets encoded by the pipeline with the step's rows loaded per encoder (placeholder '<v>'), then unloaded:
    {state: (P_v, P_c, P_simple)} for the concatenated state ("") and each encoder's columns, flattened."""
    for e in text_stack(pipe):
        load_learned_token(pipe, parts[e.name], token="<v>", text=e)
    try:
        (P_v, pool_v), (P_s, pool_s) = (encoded(pipe, [p.format("<v>") for p in CONTEXTUAL]),
                                        encoded(pipe, [p.format("<v>") for p in SIMPLE]))
    finally:
        for e in text_stack(pipe):
            pipe.unload_textual_inversion("<v>", tokenizer=e.tokenizer, text_encoder=e.encoder)
    P_c, pool_c = encoded(pipe, [p.format("dog") for p in CONTEXTUAL])
    cols = {"": slice(None), "clip_l": slice(0, 32), "clip_g": slice(32, None)}
    sets = {k: tuple(x[..., c].reshape(len(x), -1) for x in (P_v, P_c, P_s)) for k, c in cols.items()}
    sets["clip_g_pooled"] = (pool_v, pool_c, pool_s)
    return sets


def test_the_tracker_per_encoder_and_on_the_concatenated_state_against_a_direct_computation(sdxl, run):
    track = track_semantic_shift(sdxl, run, CONTEXTUAL, SIMPLE, progress=False)  # placeholder, class word: the run's
    assert track["step"] == [1, 2]
    assert "norm_ratio" not in track  # each encoder's own: clip_l_norm_ratio, clip_g_norm_ratio
    stack = text_stack(sdxl)
    for i, step in enumerate(track["step"]):
        parts = safetensors.torch.load_file(str(run / f"learned_embeds-steps-{step}.safetensors"))
        sets = direct(sdxl, parts)
        for state, (P_v, P_c, P_s) in sets.items():
            pre = f"{state}_" if state else ""
            close = dict(rel=1e-4, abs=1e-6)
            assert track[f"{pre}inter_l2"][i] == pytest.approx(ref.reference_l2_distance(P_v, P_c), **close)
            assert track[f"{pre}inter_hausdorff"][i] == pytest.approx(ref.reference_hausdorff_distance(P_v, P_c), **close)
            assert track[f"{pre}inter_kl"][i] == pytest.approx(ref.reference_kl_divergence(P_v, P_c), **close)
            assert track[f"{pre}inter_mahalanobis"][i] == pytest.approx(sm.mahalanobis_distance(P_v, P_c), rel=1e-3)
            assert track[f"{pre}intra_vstar_l2"][i] == pytest.approx(ref.reference_intra_l2(P_v), **close)
            assert track[f"{pre}intra_class_hausdorff"][i] == pytest.approx(ref.reference_intra_hausdorff(P_c), **close)
            assert track[f"{pre}vs_simple_l2"][i] == pytest.approx(ref.reference_l2_distance(P_v, P_s), **close)
            assert track[f"{pre}vs_simple_kl"][i] == pytest.approx(ref.reference_kl_divergence(P_v, P_s), **close)
        assert sets["clip_g_pooled"][0].shape == (len(CONTEXTUAL), 48)
        assert track["clip_g_pooled_inter_l2"][i] != track["clip_g_inter_l2"][i]
        # the concatenated state is not a mix of the parts' numbers: its L2 is that of the 80-wide rows
        assert track["inter_l2"][i] != track["clip_l_inter_l2"][i] != track["clip_g_inter_l2"][i]
        for e in stack:  # each encoder's row against its own encoder's class-word row, by hand
            v, c = parts[e.name][0].double(), e.word_row("dog").double()
            assert v.shape == (WIDTHS[e.name],)
            assert track[f"{e.name}_norm_ratio"][i] == pytest.approx(float(v.norm() / c.norm()), rel=1e-6)
            assert track[f"{e.name}_cosine"][i] == pytest.approx(float(v @ c / (v.norm() * c.norm())), rel=1e-6)
            assert track[f"{e.name}_vstar_norm"][i] == pytest.approx(float(v.norm()), rel=1e-6)
            assert not math.isclose(track[f"{e.name}_cosine"][i], 1.0, rel_tol=1e-9)  # the row moved off 'dog'


def test_pairs_of_steps_and_parts_and_the_refusals(sdxl, run):
    parts = safetensors.torch.load_file(str(run / "learned_embeds-steps-2.safetensors"))
    from_file = track_semantic_shift(sdxl, run, CONTEXTUAL, progress=False, representation="last")
    from_dict = track_semantic_shift(sdxl, [(1, run / "learned_embeds-steps-1.safetensors"), (2, parts)],
                                     CONTEXTUAL, class_word="dog", placeholder="<v>", progress=False,
                                     representation="last")
    assert from_file == from_dict and "vs_simple_l2" not in from_file
    full = track_semantic_shift(sdxl, run, CONTEXTUAL, progress=False)  # the pooled vector is one per prompt
    assert from_file["clip_g_pooled_inter_l2"] == full["clip_g_pooled_inter_l2"]
    assert from_file["clip_g_inter_l2"] != full["clip_g_inter_l2"]
    with pytest.raises(ValueError, match="must hold one part per text encoder of the model \\(clip_l, clip_g\\)"):
        track_semantic_shift(sdxl, [(1, parts["clip_l"])], CONTEXTUAL, class_word="dog", progress=False)
    with pytest.raises(ValueError, match="D=32 but the clip_g text encoder's rows have D=48"):
        track_semantic_shift(sdxl, [(1, {"clip_l": parts["clip_l"], "clip_g": parts["clip_l"]})], CONTEXTUAL,
                             class_word="dog", progress=False)

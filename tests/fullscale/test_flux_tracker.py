"""The shift tracker on the offline FLUX.1-dev (docs/tea.md §3): a run's rows (clip_l 32 wide, T5 48) written by hooks,
the distance columns on T5's last hidden state (the transformer's prompt_embeds, unprefixed and "t5_"), on CLIP's
last hidden state ("clip_l_") and on the pooled CLIP embedding ("clip_l_pooled_"), checked against the distances of
FluxPipeline.encode_prompt's own tensors with each step's rows loaded into the pipeline; Eq. 8 per encoder, T5's
class word of several tokens read as the mean of its rows."""
import pytest
import torch

from persviz.embeddings import load_learned_token
from persviz.families import text_stack
from persviz.hub_models import FLUX_DEV
from persviz.loading import load_pipeline
from persviz.tea import shift as sm
from persviz.tea.tracker import track_semantic_shift

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a {} on a beach", "a {} reading a newspaper", "a photo of a {} in the city", "a {} playing guitar"]
SIMPLE = ["a photo of a {}", "a {}"]


@torch.no_grad()
def reference(rows, class_word):
    """{state: (P_v, P_c, P_simple)} from a fresh pipeline with the rows loaded as '<v*>' in both encoders:
    encode_prompt's prompt_embeds (T5) and pooled_prompt_embeds, and CLIP's last hidden state as FluxPipeline
    tokenizes for it."""
    pipe = load_pipeline(FLUX_DEV, device="cpu")
    for e in text_stack(pipe):
        load_learned_token(pipe, {"<v*>": rows[e.name]}, text=e)

    def states(prompts):
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=32)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        clip = pipe.text_encoder(ids.input_ids).last_hidden_state
        return {"": prompt_embeds.flatten(1), "clip_l": clip.flatten(1), "pooled": pooled}
    fill = lambda ps, w: [p.replace("{}", w) for p in ps]  # noqa: E731
    v, c, s = states(fill(PROMPTS, "<v*>")), states(fill(PROMPTS, class_word)), states(fill(SIMPLE, "<v*>"))
    return {k: (v[k].double(), c[k].double(), s[k].double()) for k in v}


def test_the_tracker_on_flux_reads_t5_clip_and_the_pooled_embedding_as_encode_prompt(offline_sd15_cache):
    pipe = load_pipeline(FLUX_DEV, device="cpu")
    g = torch.Generator().manual_seed(5)
    steps = [(0, {"clip_l": torch.randn(1, 32, generator=g), "t5": torch.randn(1, 48, generator=g)}),
             (10, {"clip_l": 6 * torch.randn(1, 32, generator=g), "t5": 6 * torch.randn(1, 48, generator=g)})]
    track = track_semantic_shift(pipe, steps, PROMPTS, SIMPLE, class_word="teapot", placeholder="<v*>",
                                 progress=False)
    assert track["step"] == [0, 10]
    assert {"inter_l2", "t5_inter_l2", "clip_l_inter_l2", "clip_l_pooled_inter_l2", "clip_l_pooled_vs_simple_l2",
            "t5_norm_ratio", "clip_l_norm_ratio"} <= set(track)
    for k, (step, rows) in enumerate(steps):
        ref = reference({n: r[0] for n, r in rows.items()}, "teapot")
        for state, prefix in (("", ""), ("", "t5_"), ("clip_l", "clip_l_"), ("pooled", "clip_l_pooled_")):
            p_v, p_c, p_s = ref[state]
            assert track[f"{prefix}inter_l2"][k] == pytest.approx(sm.l2_distance(p_v, p_c), rel=1e-4)
            assert track[f"{prefix}intra_vstar_l2"][k] == pytest.approx(sm.intra_l2(p_v), rel=1e-4)
            assert track[f"{prefix}vs_simple_hausdorff"][k] == pytest.approx(sm.hausdorff_distance(p_v, p_s),
                                                                              rel=1e-4)
        t5_rows = pipe.text_encoder_2.get_input_embeddings().weight
        c_t5 = t5_rows[pipe.tokenizer_2("teapot", add_special_tokens=False).input_ids].mean(dim=0)
        v = rows["t5"][0]
        assert track["t5_norm_ratio"][k] == pytest.approx(float(v.norm() / c_t5.norm()), rel=1e-5)
        assert track["t5_cosine"][k] == pytest.approx(float(torch.nn.functional.cosine_similarity(v, c_t5, 0)),
                                                      abs=1e-5)
    assert track["inter_l2"][1] != track["inter_l2"][0]  # the rows reach the distances: the comparison can fail

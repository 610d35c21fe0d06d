"""Semantic-shift tracker on a tiny random pipeline: equal to direct metric calls, pipeline untouched, errors."""
import copy
import json

import numpy as np
import pytest
import torch

from persviz.tea import shift as sm
from persviz.embeddings import class_word_id, norm_ratio_and_cosine, save_learned_embeds
from persviz.prompts import fill, shapesworld_prompt_sets
from persviz.shapesworld import Obj, Scene, render_batch
from persviz.tea.tracker import load_json, save_json, to_shift_grid, track_semantic_shift
from persviz.trainers import TextualInversionConfig, list_snapshots, train_textual_inversion

from tests.helpers import D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = shapesworld_prompt_sets(n=10, seed=1)
CONTEXTUAL, SIMPLE = SETS["contextual"], SETS["simple"]


@pytest.fixture(scope="module")
def class_row(tiny_sd_pipeline_shared):
    base_pipe = tiny_sd_pipeline_shared
    W = base_pipe.text_encoder.get_input_embeddings().weight.detach()
    return W[class_word_id(base_pipe.tokenizer, "square")].clone()


@pytest.fixture(scope="module")
def embeddings(class_row):
    g = torch.Generator().manual_seed(3)
    return [(100, class_row + 0.3 * torch.randn(D, generator=g)),
            (200, 2.5 * class_row + 0.8 * torch.randn(D, generator=g))]


def _encode(pipe, prompts):
    """The pipeline's own encode_prompt: last hidden states [N, 77, D]."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, "cpu", 1, False)[0]


def _independent(base_pipe, emb, tmp_path, name="<v*>"):
    """A copy of the pipeline with the embedding loaded the diffusers way."""
    pipe = copy.deepcopy(base_pipe)
    path = save_learned_embeds({name: emb}, tmp_path / f"e{len(list(tmp_path.iterdir()))}.safetensors")
    pipe.load_textual_inversion(str(path))
    return pipe


def _state(pipe):
    te = pipe.text_encoder
    return (len(pipe.tokenizer), dict(pipe.tokenizer.added_tokens_encoder),
            {k: v.clone() for k, v in te.state_dict().items()},
            [(n, m.training) for n, m in te.named_modules()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in te.modules()])


def _assert_same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_metrics_equal_direct_calls_on_independently_encoded_prompts(tiny_sd_pipeline_shared, class_row, embeddings, tmp_path):
    base_pipe = tiny_sd_pipeline_shared
    track = track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE[:8], class_word="square", progress=False,
                                 batch_size=4)
    assert track["step"] == [100, 200]
    assert all(len(v) == 2 for v in track.values())
    P_c = _encode(base_pipe, fill(CONTEXTUAL, "square"))
    intra_c = sm.intra_distances(P_c)
    for k, (step, emb) in enumerate(embeddings):
        pipe = _independent(base_pipe, emb, tmp_path)
        P_v = _encode(pipe, fill(CONTEXTUAL, "<v*>"))
        P_s = _encode(pipe, fill(SIMPLE[:8], "<v*>"))
        assert P_v.shape == (10, 77, D)
        expected = {**{f"inter_{m}": v for m, v in sm.shift_distances(P_v, P_c).items()},
                    **{f"intra_vstar_{m}": v for m, v in sm.intra_distances(P_v).items()},
                    **{f"intra_class_{m}": v for m, v in intra_c.items()},
                    "vs_simple_l2": sm.l2_distance(P_v, P_s), "vs_simple_hausdorff": sm.hausdorff_distance(P_v, P_s),
                    "vs_simple_mahalanobis": sm.mahalanobis_distance(P_v, P_s)}
        for key, value in expected.items():
            assert track[key][k] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert track["vs_simple_kl"][k] is None  # 10 contextual vs 8 simple prompts: KL pairs rows, so undefined
        ratio, cos = norm_ratio_and_cosine(emb, class_row)
        assert track["norm_ratio"][k] == pytest.approx(float(ratio), rel=1e-6)
        assert track["cosine"][k] == pytest.approx(float(cos), rel=1e-6)
        assert track["vstar_norm"][k] == pytest.approx(float(emb.norm()), rel=1e-6)
    at_c = track_semantic_shift(base_pipe, [(0, class_row)], CONTEXTUAL, None, class_word="square", progress=False)
    assert at_c["inter_hausdorff"] == [0.0] and at_c["inter_kl"][0] == pytest.approx(0, abs=1e-12)  # P_V* = P_c
    assert at_c["inter_l2"][0] == pytest.approx(at_c["intra_class_l2"][0] * 9 / 10)  # all pairs, i = j included
    assert at_c["norm_ratio"][0] == pytest.approx(1.0) and at_c["cosine"][0] == pytest.approx(1.0)  # V* = c
    # the same with equal-size sets: KL defined; Ledoit-Wolf for the inter-set Mahalanobis; last position only
    t2 = track_semantic_shift(base_pipe, embeddings[:1], CONTEXTUAL, SIMPLE, class_word="square", progress=False,
                              covariance="ledoit_wolf", representation="last", tau=0.5)
    pipe = _independent(base_pipe, embeddings[0][1], tmp_path)
    P_v, P_s = _encode(pipe, fill(CONTEXTUAL, "<v*>"))[:, -1], _encode(pipe, fill(SIMPLE, "<v*>"))[:, -1]
    expected = sm.mahalanobis_distance(P_v, P_c[:, -1], "ledoit_wolf")
    assert t2["inter_mahalanobis"][0] == pytest.approx(expected, rel=1e-5)
    assert t2["vs_simple_kl"][0] == pytest.approx(sm.kl_divergence(P_v, P_s, 0.5), rel=1e-5, abs=1e-9)
    assert t2["inter_kl"][0] == pytest.approx(sm.kl_divergence(P_v, P_c[:, -1], 0.5), rel=1e-5, abs=1e-9)


def test_multi_vector_embedding_matches_diffusers_loading(tiny_sd_pipeline_shared, class_row, tmp_path):
    base_pipe = tiny_sd_pipeline_shared
    g = torch.Generator().manual_seed(4)
    emb = torch.stack([class_row, -0.5 * class_row]) + 0.2 * torch.randn(2, D, generator=g)
    track = track_semantic_shift(base_pipe, {7: emb}, CONTEXTUAL, None, class_word="square", placeholder="<m>",
                                 progress=False)
    assert "vs_simple_l2" not in track and track["step"] == [7]
    pipe = _independent(base_pipe, emb, tmp_path, name="<m>")
    P_v = _encode(pipe, fill(CONTEXTUAL, "<m>"))  # encode_prompt expands "<m>" to "<m> <m>_1"
    P_c = _encode(base_pipe, fill(CONTEXTUAL, "square"))
    assert track["inter_hausdorff"][0] == pytest.approx(sm.hausdorff_distance(P_v, P_c), rel=1e-5)
    ratio, cos = norm_ratio_and_cosine(emb, class_row)
    assert track["norm_ratio"][0] == pytest.approx(float(ratio.mean()), rel=1e-6)
    assert track["cosine"][0] == pytest.approx(float(cos.mean()), rel=1e-6)


def test_run_folder_of_a_tiny_textual_inversion(tiny_sd_pipeline_shared, tmp_path):
    base_pipe = tiny_sd_pipeline_shared
    obj = Obj("square", "red", "striped", "large")
    images = render_batch([Scene(obj, bg) for bg in ("gray", "white")], seed=0)
    cfg = TextualInversionConfig(placeholder="<sq>", initializer="square", steps=2, save_every=1, templates=("a {}",), lr=5e-2)
    train_textual_inversion(copy.deepcopy(base_pipe), images, cfg, tmp_path / "run", progress=False, load_result=False)
    track = track_semantic_shift(base_pipe, tmp_path / "run", CONTEXTUAL, SIMPLE, progress=False)  # "square", "<sq>"
    assert track["step"] == [1, 2]
    by_list = track_semantic_shift(base_pipe, list_snapshots(tmp_path / "run"), CONTEXTUAL, SIMPLE,
                                   class_word="square", placeholder="<sq>", progress=False)
    assert by_list == track
    assert all(v is not None and np.isfinite(v) for k, vs in track.items() for v in vs)
    assert track["cosine"][0] < 1.0 and track["norm_ratio"][0] != 1.0  # the row left its initializer

    path = save_json(track, tmp_path / "out" / "shift.json")
    assert load_json(path) == track and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    steps, grid = to_shift_grid(track)
    assert steps == [1, 2] and set(grid) == {"L2", "Hausdorff", "Mahalanobis", "KL"}
    assert grid["KL"] == {"inter d(P_V*, P_c)": track["inter_kl"], "d(P_V*, P_simple)": track["vs_simple_kl"]}
    from persviz.tea.plots import shift_grid
    assert len(shift_grid(steps, grid).axes) == 4


def test_pipeline_is_unchanged_also_after_an_error(tiny_sd_pipeline_shared, embeddings, tmp_path):
    base_pipe = tiny_sd_pipeline_shared
    pipe = copy.deepcopy(base_pipe)
    pipe.text_encoder.train()  # a mode to restore
    before = _state(pipe)
    track_semantic_shift(pipe, embeddings, CONTEXTUAL, SIMPLE, class_word="square", progress=False)
    _assert_same_state(before, _state(pipe))
    bad = [embeddings[0], (300, torch.zeros(2, D))]  # fails at the second step, inside the loop
    with pytest.raises(ValueError, match="differs from the first step"):
        track_semantic_shift(pipe, bad, CONTEXTUAL, SIMPLE, class_word="square", progress=False)
    _assert_same_state(before, _state(pipe))
    # a pipeline that already holds the placeholder: its own row is ignored while tracking and kept
    loaded = _independent(base_pipe, torch.ones(D), tmp_path)
    before = _state(loaded)
    assert track_semantic_shift(loaded, embeddings, CONTEXTUAL, SIMPLE, class_word="square", progress=False) == \
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE, class_word="square", progress=False)
    _assert_same_state(before, _state(loaded))


def test_clear_errors(tiny_sd_pipeline_shared, embeddings, tmp_path):
    base_pipe = tiny_sd_pipeline_shared
    kw = dict(class_word="square", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no learned_embeds-steps-<k>.safetensors"):
        track_semantic_shift(base_pipe, tmp_path / "empty", CONTEXTUAL, SIMPLE, **kw)
    with pytest.raises(FileNotFoundError):
        track_semantic_shift(base_pipe, tmp_path / "missing", CONTEXTUAL, SIMPLE, **kw)
    with pytest.raises(ValueError, match="run is empty"):
        track_semantic_shift(base_pipe, [], CONTEXTUAL, SIMPLE, **kw)
    with pytest.raises(ValueError, match=r"prompts: prompt 'a red square' has 0 '\{\}' placeholders"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL[:3] + ["a red square"], SIMPLE, **kw)
    with pytest.raises(ValueError, match=r"simple_prompts: prompt .* has 2"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, ["a {}", "a {} and a {}"], **kw)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL[:1], SIMPLE, **kw)
    with pytest.raises(ValueError, match="no prompt set 'nope'"):
        track_semantic_shift(base_pipe, embeddings, "nope", SIMPLE, **kw)
    with pytest.raises(ValueError, match="unknown class word 'zebra'"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE, class_word="zebra", progress=False)
    with pytest.raises(ValueError, match="pass class_word="):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE, progress=False)
    with pytest.raises(ValueError, match="word of the vocabulary"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE, placeholder="circle", **kw)
    with pytest.raises(ValueError, match="D=8 but the text encoder's rows have D=32"):
        track_semantic_shift(base_pipe, [(1, torch.ones(8))], CONTEXTUAL, SIMPLE, **kw)
    with pytest.raises(ValueError, match="NaN"):
        track_semantic_shift(base_pipe, [(1, torch.full((D,), float("nan")))], CONTEXTUAL, SIMPLE, **kw)
    with pytest.raises(ValueError, match="step must be an int"):
        track_semantic_shift(base_pipe, [("a", torch.ones(D))], CONTEXTUAL, SIMPLE, **kw)
    with pytest.raises(ValueError, match="representation must be one of"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE, representation="pooled", **kw)
    with pytest.raises(ValueError, match="tau must be"):
        track_semantic_shift(base_pipe, embeddings, CONTEXTUAL, SIMPLE, tau=0, **kw)
    with pytest.raises(ValueError, match="save_json writes a dict"):
        save_json([1, 2], tmp_path / "x.json")
    assert json.loads(save_json({"a": np.float32(1.5), "b": torch.tensor([1, 2])}, tmp_path / "y.json").read_text()) \
        == {"a": 1.5, "b": [1, 2]}

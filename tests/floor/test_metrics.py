"""persviz.metrics: CLIP-T equals torchmetrics' CLIPScore, CLIP-I / DINO-I equal a hand computation, the oracle
metric equals ShapesWorld ground truth, and bad inputs fail with clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from persviz.metrics import clip_i, clip_t, clip_t_parts, dino_i, image_alignment, oracle_concept_context
from persviz.shapesworld import Obj, Scene, caption, render_batch, sample_scenes
from persviz.shapesworld.concepts import get_concept, render_references
from persviz.shapesworld.oracle import scene_reading

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCENES = sample_scenes(6, seed=3)
IMAGES = render_batch(SCENES)
CAPTIONS = [caption(s, level="full") for s in SCENES]


@pytest.fixture(scope="module")
def dino_eval():
    from persviz.loading import load_evaluator
    return load_evaluator(kind="dino")


class _FeaturesAsTensors(torch.nn.Module):
    """The CLIPModel with get_*_features returning tensors, as torchmetrics 1.x expects.

    transformers >= 5 returns an output object (its pooler_output is the projected features); the model, its
    weights and the processor are untouched, so torchmetrics still preprocesses and encodes exactly as usual."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _t(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._t(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._t(self.model.get_text_features(*args, **kwargs))


# ----------------------------------------------------------------------------- CLIP-T


def test_clip_t_equals_torchmetrics_clipscore_on_the_shapesworld_clip(clip_eval):
    tm = pytest.importorskip("torchmetrics.multimodal")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    texts = CAPTIONS[:3] + [CAPTIONS[5], CAPTIONS[3], "a small green cross"]  # matching and mismatching captions
    ours = clip_t(clip_eval, IMAGES, texts)
    assert ours.shape == (6,) and ours.dtype == torch.float32

    metric = tm.CLIPScore(model_name_or_path=lambda: (_FeaturesAsTensors(clip_eval.model), clip_eval.processor))
    x = torch.from_numpy(IMAGES).permute(0, 3, 1, 2)  # torchmetrics takes uint8 [N, 3, H, W]
    per_image, n = _clip_score_update(list(x), texts, metric.model, metric.processor)
    assert n == 6
    torch.testing.assert_close(ours, per_image.detach().clamp(min=0), atol=1e-4, rtol=0)
    for i in range(6):  # the public metric, one image at a time (it averages, then clamps)
        metric.reset()
        metric.update(x[i], texts[i])
        torch.testing.assert_close(ours[i], metric.compute().detach(), atol=1e-4, rtol=0)
    own = clip_t(clip_eval, IMAGES[3:5], CAPTIONS[3:5])
    assert (own > ours[3:5]).all()  # sanity: an image's own caption scores higher than another scene's


def test_clip_t_accepts_pil_lists_and_one_text_for_all(clip_eval):
    pil = [Image.fromarray(a) for a in IMAGES[:3]]
    torch.testing.assert_close(clip_t(clip_eval, pil, CAPTIONS[:3]), clip_t(clip_eval, IMAGES[:3], CAPTIONS[:3]))
    one = clip_t(clip_eval, IMAGES[:3], "a circle")
    torch.testing.assert_close(one, clip_t(clip_eval, IMAGES[:3], ["a circle"] * 3))


def test_clip_t_parts_are_clip_t_of_each_part(clip_eval):
    full, concept, context = "a red circle on a navy background", "a red circle", "on a navy background"
    parts = clip_t_parts(clip_eval, IMAGES, full, concept, context)
    assert set(parts) == {"full", "concept", "context"}
    for name, text in (("full", full), ("concept", concept), ("context", context)):
        torch.testing.assert_close(parts[name], clip_t(clip_eval, IMAGES, text))


class _FakeEvaluator:
    """Embeddings chosen by hand: image i -> IMG[i], text t -> TXT[t]."""

    def __init__(self, img, txt):
        self.img, self.txt, self.calls = torch.as_tensor(img, dtype=torch.float32), txt, []

    def embed_images(self, images):
        return self.img[: len(images)]

    def embed_texts(self, texts):
        self.calls.append(list(texts))
        return torch.stack([torch.as_tensor(self.txt[t], dtype=torch.float32) for t in texts])


def test_clip_t_clamps_each_image_at_zero_and_embeds_each_text_once():
    ev = _FakeEvaluator([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], {"a": [1.0, 0.0], "b": [-1.0, 0.0]})
    out = clip_t(ev, IMAGES[:3], ["a", "b", "a"])
    torch.testing.assert_close(out, torch.tensor([100.0, 0.0, 60.0]))  # cos -0 -> 0; cos 0.6 -> 60
    assert ev.calls == [["a", "b"]]


# ----------------------------------------------------------------------------- CLIP-I / DINO-I


def _numpy_mean_cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a @ b.T).mean(axis=1)


@torch.no_grad()
def test_clip_i_equals_a_numpy_cosine_of_the_raw_clip_features(clip_eval):
    refs = render_references("spark")

    def raw(x):
        px = clip_eval.processor(images=[Image.fromarray(a) for a in x], return_tensors="pt").pixel_values
        out = clip_eval.model.get_image_features(pixel_values=px)
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).double().numpy()

    expected = _numpy_mean_cosine(raw(IMAGES), raw(refs))
    got = clip_i(clip_eval, IMAGES, refs)
    assert got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(clip_i(clip_eval, IMAGES, refs, percent=True).numpy(), 100 * expected, atol=1e-3)
    # an image of the concept itself is closer to its references than unrelated scenes
    assert clip_i(clip_eval, refs[:1], refs)[0] > got.max()


@torch.no_grad()
def test_dino_i_equals_a_numpy_cosine_of_mean_pooled_dino_features(dino_eval):
    refs = render_references("spark")
    assert dino_eval.pooling == "mean"

    def raw(x):
        px = dino_eval.processor(images=[Image.fromarray(a) for a in x], return_tensors="pt").pixel_values
        return dino_eval.model(pixel_values=px).last_hidden_state.mean(1).double().numpy()

    expected = _numpy_mean_cosine(raw(IMAGES), raw(refs))
    np.testing.assert_allclose(dino_i(dino_eval, IMAGES, refs).numpy(), expected, atol=1e-5)
    pil_refs = [Image.fromarray(a) for a in refs]
    torch.testing.assert_close(dino_i(dino_eval, IMAGES, pil_refs), image_alignment(dino_eval, IMAGES, refs))


# ----------------------------------------------------------------------------- oracle


class _PerfectOracle:
    """Reads the scenes' ground truth (what a perfect oracle would read), whatever the pixels."""

    def __init__(self, scenes):
        self.scenes = scenes

    def read(self, images):
        assert len(images) == len(self.scenes)
        return [scene_reading(s) for s in self.scenes]


def _concept_scenes():
    """7 scenes of the 'spark' concept with known contexts, and one of another object.

    (The concepts are one-color objects the trained oracle reads right on every render: docs/world.md §2a.)"""
    spark = get_concept("spark").obj
    other = Obj("square", "green", "plain", "large")
    blue_cross = Obj("cross", "blue")
    return [
        Scene(spark, "navy", "left", blue_cross),
        Scene(spark, "navy", "left", blue_cross),
        Scene(spark, "navy", "left", Obj("cross", "red")),   # wrong second object
        Scene(spark, "navy", "right", blue_cross),           # wrong position
        Scene(spark, "beige", "left", blue_cross),           # wrong background
        Scene(spark, "gray", "center"),                      # no second object, wrong background and position
        Scene(spark, "navy", "left", blue_cross),
        Scene(other, "navy", "left", blue_cross),            # wrong concept, right context
    ]


def test_oracle_concept_context_matches_shapesworld_ground_truth(oracle):
    scenes = _concept_scenes()
    images = render_batch(scenes, seed=0)
    concept = get_concept("spark").attributes()
    context = {"background": "navy", "position": "left", "second": ("blue", "cross")}
    expected = {"concept": 7 / 8, "context": 4 / 8, "both": 3 / 8, "shape": 7 / 8, "color": 7 / 8, "texture": 7 / 8,
                "size": 1.0, "background": 6 / 8, "position": 6 / 8, "second": 6 / 8}  # the other object is large too
    truth = oracle_concept_context(_PerfectOracle(scenes), images, concept, context)
    assert truth == pytest.approx(expected)
    assert oracle_concept_context(oracle, images, concept, context) == pytest.approx(expected)  # the trained oracle


def test_a_concept_in_the_wrong_slot_fails_position_only():
    scene = _concept_scenes()[3]  # spark at the right, the named blue cross at the named position (left)
    out = oracle_concept_context(_PerfectOracle([scene]), render_batch([scene]), get_concept("spark").attributes(),
                                 {"position": "left", "second": ("blue", "cross")})
    assert out == {"concept": 1.0, "context": 0.0, "both": 0.0, "shape": 1.0, "color": 1.0, "texture": 1.0,
                   "size": 1.0, "position": 0.0, "second": 1.0}


def test_oracle_concept_context_parts_and_none_values(oracle):
    scenes = _concept_scenes()
    images = render_batch(scenes, seed=0)
    perfect = _PerfectOracle(scenes)
    only_concept = oracle_concept_context(perfect, images, {"shape": "triangle", "color": "orange"},
                                          {"position": None})
    assert only_concept == pytest.approx({"concept": 7 / 8, "context": 1.0, "both": 7 / 8, "shape": 7 / 8,
                                          "color": 7 / 8})
    only_context = oracle_concept_context(perfect, images, {}, {"background": "navy"})
    assert only_context == pytest.approx({"concept": 1.0, "context": 6 / 8, "both": 6 / 8, "background": 6 / 8})
    pil = [Image.fromarray(a) for a in images]
    assert oracle_concept_context(oracle, pil, {}, {"background": "navy"}) == pytest.approx(only_context)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("images, match", [
    (np.zeros((0, 32, 32, 3), np.uint8), "empty"),
    ([], "empty"),
    (IMAGES.astype(np.float32) / 255, "uint8"),
    (IMAGES[0], r"\[N, H, W, 3\].*images\[None\]"),
    (IMAGES[..., :1], r"\[N, H, W, 3\]"),
    (torch.from_numpy(IMAGES), "torch.Tensor"),
    ([IMAGES[0], IMAGES[1]], "PIL"),
    (Image.fromarray(IMAGES[0]), r"wrap it as \[image\]"),
    ([Image.fromarray(IMAGES[0]), Image.fromarray(IMAGES[0]).resize((16, 16))], "mixes image sizes"),
    ("image.png", "uint8 array"),
])
def test_bad_images_are_refused_with_a_clear_message(images, match):
    ev = _FakeEvaluator(np.eye(2), {"a": [1.0, 0.0]})
    with pytest.raises(ValueError, match=match):
        clip_t(ev, images, "a")
    with pytest.raises(ValueError, match=match):
        clip_i(ev, images, IMAGES[:1])
    with pytest.raises(ValueError, match=match):
        oracle_concept_context(_PerfectOracle(SCENES[:1]), images, {"shape": "circle"}, {})


def test_bad_texts_and_references_are_refused():
    ev = _FakeEvaluator(np.eye(3)[:, :2], {"a": [1.0, 0.0]})
    with pytest.raises(ValueError, match="got 3 images but 2 texts"):
        clip_t(ev, IMAGES[:3], ["a", "a"])
    with pytest.raises(ValueError, match="texts is empty"):
        clip_t(ev, IMAGES[:3], [])
    with pytest.raises(ValueError, match="non-empty string"):
        clip_t(ev, IMAGES[:1], [""])
    with pytest.raises(ValueError, match="got 3 images but 1 context"):
        clip_t_parts(ev, IMAGES[:3], "a", "a", ["a"])
    with pytest.raises(ValueError, match="references is empty"):
        clip_i(ev, IMAGES[:3], [])
    with pytest.raises(ValueError, match="references must be uint8"):
        dino_i(ev, IMAGES[:3], IMAGES[:2].astype(np.float64))


@pytest.mark.parametrize("concept, context, match", [
    ({"shape": "hexagon"}, {}, "concept\\['shape'\\] is 'hexagon'"),
    ({"background": "navy"}, {}, r"unknown attribute.*\['background'\] belong to context"),
    ({}, {"color": "red"}, r"\['color'\] belong to concept"),
    ({}, {"second": "blue square"}, r"\(color, shape\) pair"),
    ({}, {}, "name at least one"),
    ({"shape": None}, {"position": None}, "name at least one"),
    (["circle"], {}, "must be a dict"),
])
def test_bad_attribute_dicts_are_refused(concept, context, match):
    with pytest.raises(ValueError, match=match):
        oracle_concept_context(_PerfectOracle(SCENES[:1]), IMAGES[:1], concept, context)

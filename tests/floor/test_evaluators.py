"""persviz.evaluators on the shipped ShapesWorld CLIP (the `clip_eval` fixture): unit-norm float32 embeddings of the
model's width, equal to transformers' own CLIPModel + CLIPProcessor on the same folder, whatever the image form and
the batch size."""
import numpy as np
import pytest
import torch
from PIL import Image

from persviz.evaluators import HFDinoEvaluator
from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld import caption, render_batch, sample_scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCENES = sample_scenes(5, seed=11, p_second=0.0)
IMAGES = render_batch(SCENES)  # uint8 [5, H, W, 3]
TEXTS = [caption(s, level="full") for s in SCENES]


@pytest.fixture(scope="module")
def reference_clip():
    """The same weights loaded by transformers directly, without persviz."""
    from transformers import CLIPModel, CLIPProcessor
    return CLIPModel.from_pretrained(SHAPESWORLD_DIR / "clip").eval(), CLIPProcessor.from_pretrained(SHAPESWORLD_DIR / "clip")


def _unit(x):
    x = x.detach().double().numpy() if isinstance(x, torch.Tensor) else x
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_image_and_text_embeddings_are_unit_float32_of_the_projection_width(clip_eval):
    width = clip_eval.model.config.projection_dim
    img, txt = clip_eval.embed_images(IMAGES), clip_eval.embed_texts(TEXTS)
    assert img.shape == (5, width) and txt.shape == (5, width)
    assert img.dtype == torch.float32 and txt.dtype == torch.float32 and img.device.type == "cpu"
    np.testing.assert_allclose(img.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(txt.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_embeddings_equal_transformers_on_the_same_folder(clip_eval, reference_clip):
    model, processor = reference_clip
    with torch.no_grad():
        px = processor(images=[Image.fromarray(a) for a in IMAGES], return_tensors="pt").pixel_values
        ref_img = _unit(_features(model.get_image_features(pixel_values=px)))
        enc = processor.tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
        ref_txt = _unit(_features(model.get_text_features(**enc)))
    np.testing.assert_allclose(clip_eval.embed_images(IMAGES).numpy(), ref_img, atol=1e-5)
    np.testing.assert_allclose(clip_eval.embed_texts(TEXTS).numpy(), ref_txt, atol=1e-5)


def test_every_image_form_gives_the_same_embedding(clip_eval):
    base = clip_eval.embed_images(IMAGES)
    forms = [
        [Image.fromarray(a) for a in IMAGES],  # PIL
        IMAGES.astype(np.float32) / 255.0,  # float [0, 1]
        torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 255.0,  # [N, 3, H, W] tensor
    ]
    for f in forms:
        torch.testing.assert_close(clip_eval.embed_images(f), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_eval.embed_images(IMAGES[2]), base[2:3], atol=1e-5, rtol=0)  # one image


def test_batch_size_does_not_change_the_result(clip_eval, monkeypatch):
    img, txt = clip_eval.embed_images(IMAGES), clip_eval.embed_texts(TEXTS)
    monkeypatch.setattr(clip_eval, "batch_size", 2)  # 5 inputs: batches of 2, 2, 1
    torch.testing.assert_close(clip_eval.embed_images(IMAGES), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_eval.embed_texts(TEXTS), txt, atol=1e-5, rtol=0)


def test_texts_must_be_a_non_empty_list(clip_eval):
    for bad in ("a red circle", []):
        with pytest.raises(ValueError, match="non-empty list of strings"):
            clip_eval.embed_texts(bad)


def test_dino_pooling_must_be_mean_or_cls():
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'cls', got 'max'"):
        HFDinoEvaluator(None, None, "cpu", torch.float32, pooling="max")

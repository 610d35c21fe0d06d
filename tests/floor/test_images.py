"""persviz.images: as_uint8 / to_pil against hand-worked pixel values and PIL."""
import numpy as np
import pytest
import torch
from PIL import Image

from persviz.images import as_uint8, to_pil


def test_floats_in_0_1_are_scaled_rounded_and_clipped():
    x = np.array([0.0, 1.0, 0.5, 0.1, 1.5, -0.2], dtype=np.float64).reshape(1, 1, 2, 3)
    out = as_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    # 0.5 * 255 = 127.5 and 0.1 * 255 = 25.5 round half to even: 128 and 26; 1.5 and -0.2 clip to 255 and 0
    assert out.ravel().tolist() == [0, 255, 128, 26, 255, 0]


def test_uint8_passes_through_and_one_image_gets_a_batch_axis():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = as_uint8(img)
    assert out.shape == (1, 2, 3, 3) and np.array_equal(out[0], img)


def test_pil_images_of_any_mode_become_rgb():
    rgb = Image.new("RGB", (4, 3), (10, 20, 30))
    grey = Image.new("L", (4, 3), 77)
    rgba = Image.new("RGBA", (4, 3), (1, 2, 3, 0))
    rgba.putpixel((0, 0), (1, 2, 3, 255))
    out = as_uint8([rgb, grey, rgba])
    assert out.shape == (3, 3, 4, 3)  # PIL size is (W, H)
    assert out[0, 2, 3].tolist() == [10, 20, 30] and out[1, 0, 0].tolist() == [77, 77, 77]
    # alpha is composited over white (persviz.images.to_rgb): transparent pixels are white, opaque ones keep their colour
    assert out[2, 1, 1].tolist() == [255, 255, 255] and out[2, 0, 0].tolist() == [1, 2, 3]
    assert as_uint8(rgb).shape == (1, 3, 4, 3)


def test_channel_first_tensors_are_moved_to_channel_last():
    t = torch.zeros(1, 3, 2, 4)
    t[0, 0, 1, 3], t[0, 1, 0, 2], t[0, 2, 1, 0] = 1.0, 1.0, 1.0  # red at (y=1, x=3), green (0, 2), blue (1, 0)
    out = as_uint8(t)
    assert out.shape == (1, 2, 4, 3)
    assert out[0, 1, 3].tolist() == [255, 0, 0] and out[0, 0, 2].tolist() == [0, 255, 0]
    assert out[0, 1, 0].tolist() == [0, 0, 255] and out.sum() == 3 * 255


@pytest.mark.parametrize("images,match", [
    ([], "no images"),
    (np.zeros((1, 4, 4, 4)), "shaped"),
    (np.zeros((4, 4)), "shaped"),
    (np.full((1, 2, 2, 3), np.nan), "NaN"),
])
def test_bad_images_are_refused(images, match):
    with pytest.raises(ValueError, match=match):
        as_uint8(images)


def test_to_pil_matches_what_pil_reads_back():
    arr = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    pils = to_pil(arr)
    assert [p.size for p in pils] == [(6, 5), (6, 5)] and all(p.mode == "RGB" for p in pils)
    assert all(np.array_equal(np.asarray(p), a) for p, a in zip(pils, arr))
    assert pils[1].getpixel((4, 3)) == tuple(int(v) for v in arr[1, 3, 4])

"""persviz.images.read_image: every common image mode becomes uint8 RGB faithfully, checked against hand-made
arrays and hand-worked formulas (16-bit scaled by 1/257, alpha over white, CMYK (255-C)(255-K)/255, EXIF
orientation as numpy's rotations); what cannot be read faithfully is refused with one sentence."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from persviz.concept_folder import load_images
from persviz.errors import ImageReadError, PersvizError
from persviz.images import MAX_PIXELS, read_image


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32896, 65535], [128, 1000, 40000, 65280]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")  # the file really is 16-bit
    want = np.round(a / 257.0).astype(np.uint8)  # 0, 1, 128, 255 / 0, 4, 156, 254
    assert want.tolist() == [[0, 1, 128, 255], [0, 4, 156, 254]]
    got = read_image(tmp_path / "g16.png")
    assert got.dtype == np.uint8 and got.shape == (2, 4, 3)
    assert (got == want[..., None]).all()
    # what the old reader did: Pillow's convert('RGB') clips I;16 to 255 (all white but the zero)
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB"))[0, 1:] == 255).all()


def test_32_bit_integer_in_the_16_bit_range_reads_like_16_bit_and_beyond_is_refused(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    assert read_image(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I").save(tmp_path / "big.tif")
    with pytest.raises(ImageReadError, match="outside 0..65535"):
        read_image(tmp_path / "big.tif")


def test_palette_keeps_its_colours_and_its_transparent_index_is_white(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (768 - 9))
    im.putdata([0, 1, 2])
    im.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50], [0, 0, 0]]]
    im.save(tmp_path / "pt.png", transparency=2)
    assert read_image(tmp_path / "pt.png").tolist() == [[[10, 20, 30], [200, 100, 50], [255, 255, 255]]]


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = 128 / 255  # by hand: c * a + 255 * (1 - a)
    want = [[[200, 100, 0], [255, 255, 255], [round(200 * a + 255 * (1 - a)), round(100 * a + 255 * (1 - a)),
                                               round(255 * (1 - a))]]]
    assert want[0][2] == [227, 177, 127]
    assert read_image(tmp_path / "a.png").tolist() == want
    la = np.array([[[40, 255], [40, 0]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png").tolist() == [[[40, 40, 40], [255, 255, 255]]]


def test_cmyk_follows_the_multiplicative_formula(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 25, 128]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    want = np.round((255 - c) * (255 - k) / 255).astype(np.uint8)
    assert want[0, 3].tolist() == [77, 102, 115]
    assert (read_image(tmp_path / "c.tif") == want).all()


@pytest.mark.parametrize("orientation,turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                              (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # not symmetric: every turn differs
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    assert (read_image(tmp_path / "o.png") == turn(a)).all()


def test_bilevel_and_grayscale(tmp_path):
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]
    Image.fromarray(np.array([[7, 200]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert read_image(tmp_path / "l.png").tolist() == [[[7, 7, 7], [200, 200, 200]]]


def test_unreadable_images_are_refused_with_one_sentence(tmp_path):
    Image.fromarray(np.ones((2, 2), np.float32), "F").save(tmp_path / "f.tif")
    (tmp_path / "text.png").write_text("not an image")
    good = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(good)
    (tmp_path / "half.png").write_bytes(good.read_bytes()[:60])
    for name, match in (("f.tif", "mode 'F'"), ("text.png", "not a readable image"), ("half.png", "not a readable image")):
        with pytest.raises(ImageReadError, match=match) as info:
            read_image(tmp_path / name)
        assert isinstance(info.value, PersvizError) and "\n" not in str(info.value)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few KB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(ImageReadError, match="more than persviz reads"):
        read_image(tmp_path / "bomb.png")
    with pytest.raises(PersvizError, match="more than persviz reads"):  # the concept folder's reader too
        load_images([tmp_path / "bomb.png"])

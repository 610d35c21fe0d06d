import numpy as np
import pytest

from persviz.shapesworld import Obj, Scene, Style, render, render_batch, sample_scenes
from persviz.shapesworld.render import RADIUS, SLOT_X
from persviz.shapesworld.scene import RGB


def _area_fraction(img, color):
    return np.mean(np.all(np.abs(img.astype(int) - np.array(color)) <= 3, axis=-1))


def test_plain_circle_area_and_color_match_the_geometry():
    # a large plain circle of radius r (fraction of the width) covers pi r^2 of the image
    img = render(Scene(Obj("circle", "red", size="large"), "black", "center"), size=128)
    assert tuple(img[64, 64]) == RGB["red"]
    assert tuple(img[2, 2]) == RGB["black"]
    expected = np.pi * RADIUS["large"] ** 2
    assert abs(_area_fraction(img, RGB["red"]) - expected) < 0.02 * expected + 0.01


def test_square_is_larger_than_diamond_and_positions_follow_slots():
    sq = render(Scene(Obj("square", "blue"), "white", "left"), size=128)
    di = render(Scene(Obj("diamond", "blue"), "white", "left"), size=128)
    assert _area_fraction(sq, RGB["blue"]) > _area_fraction(di, RGB["blue"])
    cols = np.where(np.all(sq == RGB["blue"], axis=-1))[1]
    assert abs(cols.mean() / 128 - SLOT_X["left"]) < 0.02


def test_textures_add_a_second_color_and_pattern_color_overrides_it():
    plain = render(Scene(Obj("square", "green", "plain", "large"), "white"), size=64)
    striped = render(Scene(Obj("square", "green", "striped", "large"), "white"), size=64)
    assert _area_fraction(striped, RGB["green"]) < 0.7 * _area_fraction(plain, RGB["green"])
    custom = render(Scene(Obj("square", "green", "checkered", "large", pattern_color=(250, 0, 250)), "white"), size=64)
    assert _area_fraction(custom, (250, 0, 250)) > 0.05


def test_second_object_stands_opposite():
    s = Scene(Obj("circle", "red"), "gray", "left", Obj("square", "blue"))
    assert s.second_position == "right" and set(s.slots()) == {"left", "right"}
    img = render(s, size=64)
    blue_cols = np.where(np.all(np.abs(img.astype(int) - RGB["blue"]) <= 3, axis=-1))[1]
    assert blue_cols.min() > 32


def test_style_knobs_do_what_they_say():
    s = Scene(Obj("circle", "blue", size="large"), "gray")
    base = render(s).astype(float)
    warm = render(s, Style(warmth=1.0)).astype(float)
    assert warm[16, 16, 0] > base[16, 16, 0] and warm[16, 16, 2] < base[16, 16, 2]
    dark = render(s, Style(bg_darkness=1.0)).astype(float)
    assert dark[1, 1].mean() < 0.3 * base[1, 1].mean()
    big = render(s, Style(size_scale=1.3))
    assert _area_fraction(big, RGB["blue"]) > 1.5 * _area_fraction(render(s), RGB["blue"])
    blurred = render(s, Style(blur=1.5)).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).max() < np.abs(np.diff(base, axis=1)).max()


def test_rendering_is_determined_by_the_seed():
    scenes = sample_scenes(20, seed=3)
    assert scenes == sample_scenes(20, seed=3) and scenes != sample_scenes(20, seed=4)
    a, b = render_batch(scenes, seed=1), render_batch(scenes, seed=1)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)


@pytest.mark.parametrize("bad", [dict(shape="hexagon", color="red"), dict(shape="circle", color="teal"),
                                 dict(shape="circle", color="red", texture="wavy")])
def test_unknown_attributes_are_refused(bad):
    with pytest.raises(ValueError, match="unknown"):
        Obj(**bad)


def test_bad_scenes_and_styles_are_refused():
    with pytest.raises(ValueError, match="background"):
        Scene(Obj("circle", "red"), "mauve")
    with pytest.raises(ValueError, match="second object"):
        Scene(Obj("circle", "red"), "gray", "center", Obj("square", "blue"))
    with pytest.raises(ValueError, match="warmth"):
        Style(warmth=2.0)
    with pytest.raises(ValueError, match="finite"):
        Style(blur=float("nan"))


def test_render_layers_without_extra_objects_is_render_and_its_coverage_is_the_objects_pixels():
    from persviz.shapesworld.render import Placed, render_layers
    for i, s in enumerate(sample_scenes(40, seed=5, p_second=0.5)):
        img, cover = render_layers(s, rng=np.random.default_rng(i))
        assert np.array_equal(img, render(s, rng=np.random.default_rng(i)))
        assert cover.shape == (1 + (s.second is not None), 32, 32)
    # a plain red square on black: its coverage is where the image is (partly) red, and sums to its area
    scene = Scene(Obj("square", "red", size="large"), "black", "left")
    img, cover = render_layers(scene, size=64)
    side = 2 * 0.84 * RADIUS["large"] * 64
    assert abs(cover[0].sum() - side ** 2) < 4 * side  # the area up to the supersampled edge
    assert np.all((cover[0] == 1) == np.all(img == RGB["red"], axis=-1))
    # an object placed under the main one: its visible coverage excludes what the main object paints over it
    under = Placed(Obj("circle", "blue"), SLOT_X["left"] + 0.1, 0.5, 0.2)
    img2, cover2 = render_layers(scene, [under], size=64)
    assert cover2.shape == (2, 64, 64) and np.all(cover2.sum(0) <= 1 + 1e-12)
    assert np.allclose(cover2[1], cover[0])  # the main object is painted last and shows whole
    blue = np.all(img2 == RGB["blue"], axis=-1)
    assert blue.any() and np.all(cover2[0][blue] == 1) and not np.any(blue & (cover2[1] > 0))
    with pytest.raises(ValueError, match="radius"):
        Placed(Obj("circle", "blue"), 0.5, 0.5, 0.0)

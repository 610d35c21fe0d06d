"""persviz.finexl.generators: the generator protocol, its adapters, and paired sampling (with bad inputs)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from persviz.finexl.generators import (FolderGenerator, ImageFolderGenerator, ImageGenerator, PipelineGenerator,
                                       RendererGenerator, pair_labels, paired_samples, parse_caption,
                                       shapesworld_probes)
from persviz.generation import generate
from persviz.shapesworld.captions import caption
from persviz.shapesworld.render import Style, render_batch
from persviz.shapesworld.scene import Obj, Scene, sample_scenes
from tests.helpers import make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- caption parsing


def test_parse_caption_inverts_full_captions_exactly():
    for scene in sample_scenes(300, seed=1):
        assert parse_caption(caption(scene, level="full")) == scene


def test_parse_caption_keeps_named_attributes_and_draws_the_rest_from_the_rng():
    rng = np.random.default_rng(2)
    for scene in sample_scenes(200, seed=3):
        text = caption(scene, rng)  # random detail, sometimes with a prefix
        a = parse_caption(text, np.random.default_rng(7))
        assert a == parse_caption(text, np.random.default_rng(7))  # the seed fixes the free attributes
        assert a.obj.shape == scene.obj.shape
        for attr in ("color", "texture", "size"):
            if getattr(scene.obj, attr) in text.split():
                assert getattr(a.obj, attr) == getattr(scene.obj, attr)
        if f"on a {scene.background}" in text or f"on an {scene.background}" in text:
            assert a.background == scene.background
        assert (a.second is not None) == ("next to" in text)
    assert parse_caption("A photo of a  RED circle").obj.color == "red"


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError, match="not a ShapesWorld caption.*shapesworld_probes"):
        parse_caption("a watercolor painting of a cat")
    with pytest.raises(ValueError, match="in the center next to a second one"):
        parse_caption("a red circle in the center next to a blue square")


def test_shapesworld_probes_are_distinct_and_seeded():
    prompts, scenes = shapesworld_probes(24, seed=0)
    assert len(prompts) == len(set(prompts)) == len(scenes) == 24
    assert shapesworld_probes(24, seed=0) == (prompts, scenes)
    assert [parse_caption(p) for p in prompts] == scenes  # full captions name the whole scene
    terse, _ = shapesworld_probes(5, seed=0, level="terse")
    assert all(len(t.split()) == 3 for t in terse)
    with pytest.raises(ValueError, match="n must be >= 1"):
        shapesworld_probes(0)


# ----------------------------------------------------------------------------- renderer as a generator


def test_renderer_generator_protocol_and_seeding():
    prompts, scenes = shapesworld_probes(6, seed=0)
    gen = RendererGenerator(Style())
    assert isinstance(gen, ImageGenerator)
    imgs = gen(prompts, 10)
    assert imgs.dtype == np.uint8 and imgs.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(imgs, gen(prompts, 10))
    # image i uses seed + i: a batch split never changes an image
    np.testing.assert_array_equal(imgs[3:], gen(prompts[3:], 13))
    # and it is exactly the renderer's image of the parsed scene with that seed
    np.testing.assert_array_equal(imgs[2], render_batch([scenes[2]], Style(), seed=12)[0])


def test_renderer_pairs_differ_only_by_the_style():
    prompts, _ = shapesworld_probes(8, seed=1)
    base, warm = RendererGenerator(Style()), RendererGenerator(Style(warmth=0.8))
    b, w = paired_samples(base, warm, prompts, seeds=[0, 100])
    assert b.shape == w.shape == (16, 32, 32, 3)
    red_minus_blue = lambda x: (x[..., 0].astype(float) - x[..., 2]).mean()  # noqa: E731
    assert red_minus_blue(w) > red_minus_blue(b) + 20  # the known personalization: warmer colors
    # same scene and layout: a darker background changes the background pixels and leaves the objects alone
    b, d = paired_samples(base, RendererGenerator(Style(bg_darkness=1.0)), prompts, seeds=[0])
    changed = np.any(b != d, axis=-1).mean(axis=(1, 2))  # fraction of changed pixels per image
    assert np.all(changed > 0.3) and np.all(changed < 0.97)
    corner = (slice(0, 3), slice(0, 3))  # always background
    assert np.all(np.any(b[:, corner[0], corner[1]] != d[:, corner[0], corner[1]], axis=-1))


def test_renderer_uses_the_scene_mapping_for_any_caption_level():
    prompts, scenes = shapesworld_probes(5, seed=2, level="terse")
    gen = RendererGenerator(Style(), scenes=dict(zip(prompts, scenes)))
    assert [gen.scene_for(p, 0) for p in prompts] == scenes
    # without the mapping, terse captions leave attributes to the seed
    free = RendererGenerator(Style())
    assert free.scene_for(prompts[0], 0).obj.shape == scenes[0].obj.shape
    with pytest.raises(TypeError, match="must be a Scene"):
        RendererGenerator(Style(), scenes={"a red circle": "not a scene"})
    with pytest.raises(TypeError, match="Style"):
        RendererGenerator({"warmth": 0.5})


# ----------------------------------------------------------------------------- pairing and its bad inputs


def test_paired_samples_rows_and_labels():
    prompts = ["a red circle", "a blue square", "a green cross"]
    b, p = paired_samples(RendererGenerator(Style()), RendererGenerator(Style(blur=1.0)), prompts, seeds=[0, 50])
    labels = pair_labels(prompts, [0, 50])
    assert len(b) == len(labels) == 6
    assert labels[4] == ("a blue square", 51)
    np.testing.assert_array_equal(b[4], RendererGenerator(Style())(["a blue square"], 51)[0])


def test_generators_of_different_sizes_error_or_resize():
    prompts = ["a red circle", "a blue square"]
    small, big = RendererGenerator(Style()), RendererGenerator(Style(warmth=0.5), size=48)
    with pytest.raises(ValueError, match="gives 32x32 images but the personalized one gives 48x48.*resize="):
        paired_samples(small, big, prompts)
    b, p = paired_samples(small, big, prompts, resize=32)  # the stated fallback: resample both
    assert b.shape == p.shape == (2, 32, 32, 3)
    b, p = paired_samples(small, big, prompts, resize=(40, 40))
    assert b.shape == p.shape == (2, 40, 40, 3)


def test_paired_samples_bad_generators_and_inputs():
    prompts = ["a red circle", "a blue square"]
    good = RendererGenerator(Style())
    with pytest.raises(ValueError, match="returned 1 images for 2 prompts"):
        paired_samples(good, lambda ps, s: good(ps, s)[:1], prompts)
    with pytest.raises(ValueError, match="must return images shaped \\[N, H, W, 3\\]"):
        paired_samples(good, lambda ps, s: np.zeros((2, 8, 8)), prompts)
    with pytest.raises(ValueError, match="non-empty list"):
        paired_samples(good, good, [])
    with pytest.raises(ValueError, match="non-empty list"):
        paired_samples(good, good, "a red circle")
    with pytest.raises(ValueError, match="at least one seed"):
        paired_samples(good, RendererGenerator(Style(blur=1.0)), prompts, seeds=[])
    # float images in [0, 1] are accepted and converted
    with pytest.warns(UserWarning, match="identical"):
        b, p = paired_samples(good, lambda ps, s: good(ps, s) / 255.0, prompts)
    assert p.dtype == np.uint8 and np.abs(b.astype(int) - p).max() <= 1


def test_identical_generators_and_overlapping_seeds_warn():
    prompts = ["a red circle", "a blue square", "a green cross"]
    with pytest.warns(UserWarning, match="identical images.*V_div = 0"):
        paired_samples(RendererGenerator(Style()), RendererGenerator(Style()), prompts)
    with pytest.warns(UserWarning, match="closer than len\\(prompts\\) = 3"):
        paired_samples(RendererGenerator(Style()), RendererGenerator(Style(noise=5.0)), prompts, seeds=[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paired_samples(RendererGenerator(Style()), RendererGenerator(Style(noise=5.0)), prompts, seeds=[0, 3])


# ----------------------------------------------------------------------------- diffusers pipeline


def test_pipeline_generator_matches_generate():
    pipe = make_tiny_sd_pipeline()
    gen = PipelineGenerator(pipe, guidance=2.0, steps=2)
    prompts = ["a red circle", "a blue square"]
    imgs = gen(prompts, 5)
    assert imgs.dtype == np.uint8 and imgs.ndim == 4 and imgs.shape[0] == 2 and imgs.shape[-1] == 3
    np.testing.assert_array_equal(imgs, generate(pipe, prompts, seed=5, guidance=2.0, steps=2))
    np.testing.assert_array_equal(imgs[1:], gen(prompts[1:], 6))  # seed + i convention
    with pytest.raises(ValueError, match="steps must be >= 1"):
        PipelineGenerator(pipe, steps=0)
    with pytest.raises(TypeError, match="callable diffusers pipeline"):
        PipelineGenerator("not a pipeline")


# ----------------------------------------------------------------------------- folders


def _write(folder, name, img):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / name)


def test_folder_generator_pairs_by_name_and_serves_metadata(tmp_path):
    prompts = ["a red circle", "a blue square"]
    base, pers = RendererGenerator(Style()), RendererGenerator(Style(outline=1.5))
    a, b = tmp_path / "base", tmp_path / "pers"
    for folder, gen in ((a, base), (b, pers)):
        rows = []
        for s in (0, 10):
            for i, (prompt, img) in enumerate(zip(prompts, gen(prompts, s))):
                name = f"{s + i:04d}_{i}.png"
                _write(folder, name, img)
                rows.append(json.dumps({"file_name": name, "prompt": prompt, "seed": s + i}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    fg = FolderGenerator(a, b)
    ia, ib = fg.load()
    assert ia.shape == ib.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(ia[0], base(prompts, 0)[0])  # sorted names: 0000_0.png first
    # with metadata, each side is a generator: the same pairs as the generators themselves
    fb, fp = paired_samples(fg.base, fg.personalized, prompts, seeds=[0, 10])
    eb, ep = paired_samples(base, pers, prompts, seeds=[0, 10])
    np.testing.assert_array_equal(fb, eb)
    np.testing.assert_array_equal(fp, ep)
    assert fg.base.prompts() == prompts
    with pytest.raises(KeyError, match="no image for \\(prompt, seed\\).*seed \\+ i"):
        fg.base(prompts, 5)


def test_folder_generator_bad_folders(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "x.png", img)
    _write(b, "y.png", img)
    with pytest.raises(ValueError, match="do not pair up.*only in .*a: \\['x.png'\\]"):
        FolderGenerator(a, b).load()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderGenerator(a, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found"):
        ImageFolderGenerator(a)
    # sizes: one folder mixing sizes, then two folders of different sizes
    c, d = tmp_path / "c", tmp_path / "d"
    _write(c, "x.png", img)
    _write(d, "x.png", np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="gives 32x32 images but the personalized one gives 48x48"):
        FolderGenerator(c, d).load()
    ia, ib = FolderGenerator(c, d).load(resize=32)
    assert ia.shape == ib.shape == (1, 32, 32, 3)
    _write(c, "z.png", np.zeros((16, 16, 3), np.uint8))
    _write(d, "z.png", np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="images in .*c differ in size"):
        FolderGenerator(c, d).load()
    (c / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        ImageFolderGenerator(c)
    e, f = tmp_path / "e", tmp_path / "f"
    e.mkdir(), f.mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderGenerator(e, f).load()


def test_obj_scene_mapping_roundtrip_for_a_hand_made_scene():
    scene = Scene(Obj("cross", "pink", "dotted", "large"), "navy", "left", Obj("circle", "cyan"))
    assert parse_caption(caption(scene, level="full")) == scene

"""ShapesWorld users for Pigeon (persviz.pigeon.users): exact noise rates, taste ground truth, splits, validation.

CPU, one thread, a few seconds (the oracle check loads the 10 MB oracle once)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from persviz.pigeon.users import (HISTORY_LEN, PigeonDataset, Taste, check_ratio, make_datasets, make_user,
                                  make_users, split_users, taste_report, validate_request, windows_of)
from persviz.shapesworld.render import render
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, SHAPES, TEXTURES
from persviz.paths import SHAPESWORLD_DIR

RATES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def users():
    return make_users(60, seed=3, noise_rates=RATES)


# ---------------------------------------------------------------- noise rate and taste, from the scene ground truth
def test_every_history_holds_exactly_the_stated_noise_fraction(users) -> None:
    seen, patterns = set(), {}
    for u in users:
        k = round(u.noise_rate * HISTORY_LEN)
        assert u.noise_rate == RATES[u.user_id % len(RATES)]
        starts = u.window_starts()
        assert starts, f"user {u.user_id} has no window"
        for s in starts:
            flags = u.is_noise[s:s + HISTORY_LEN]
            assert sum(flags) == k, (u.user_id, s, flags)
            assert not u.is_noise[s + HISTORY_LEN]  # the target is a liked image
            patterns.setdefault(k, set()).add(tuple(i for i, f in enumerate(flags) if f))
        seen.add(k)
    assert seen == set(range(HISTORY_LEN + 1))
    for k in range(1, HISTORY_LEN):  # the noise does not always sit at the same history slots
        assert len(patterns[k]) > 1, (k, patterns[k])


def test_liked_images_carry_the_taste_and_noise_images_do_not(users) -> None:
    for u in users:
        t = u.taste
        assert 1 <= len(t.colors) <= 2 and set(t.colors) <= set(COLORS)
        assert t.texture in TEXTURES and t.background in BACKGROUNDS
        for scene, noisy, ref in zip(u.scenes, u.is_noise, u.references):
            if noisy:
                assert not t.matches(scene.obj, scene.background) and ref is None
            else:
                assert scene.obj.color in t.colors and scene.obj.texture == t.texture
                assert scene.background == t.background and scene.second is None
                # the reference: same content, a style that is not the whole taste
                assert (ref.obj.shape, ref.obj.size, ref.position) == (scene.obj.shape, scene.obj.size, scene.position)
                assert not t.matches(ref.obj, ref.background)
    liked_shapes = {s.obj.shape for u in users for s, n in zip(u.scenes, u.is_noise) if not n}
    assert liked_shapes == set(SHAPES)  # varied shapes
    assert any(len(u.taste.colors) == 2 for u in users) and any(len(u.taste.colors) == 1 for u in users)


def test_windows_slide_over_six_interactions(users) -> None:
    u = users[7]
    ws = windows_of([u])
    assert [w.start for w in ws] == u.window_starts()
    for w in ws:
        assert w.history == u.scenes[w.start:w.start + 5] and w.target == u.scenes[w.start + 5]
        assert w.history_is_noise == u.is_noise[w.start:w.start + 5]
        assert w.reference == u.references[w.start + 5]
        assert w.instruction == f"a {w.target.obj.shape}"


def test_deterministic_by_seed() -> None:
    a, b = make_users(8, seed=1), make_users(8, seed=1)
    assert a == b
    assert make_users(12, seed=1)[:8] == a  # adding users leaves the earlier ones alone
    assert make_users(8, seed=2) != a
    d1, d2 = PigeonDataset(a, seed=1), PigeonDataset(b, seed=1)
    for i in (0, len(d1) - 1):
        x, y = d1[i], d2[i]
        assert torch.equal(x["history"], y["history"]) and torch.equal(x["target"], y["target"])


# ---------------------------------------------------------------- splits and the dataset
def test_split_by_user_has_no_overlap() -> None:
    us = make_users(50, seed=0)
    splits = split_users(us, (0.8, 0.1, 0.1), seed=0)
    ids = {k: {u.user_id for u in v} for k, v in splits.items()}
    assert [len(ids[k]) for k in ("train", "val", "test")] == [40, 5, 5]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == set(range(50))
    assert split_users(us, seed=0) == splits and split_users(us, seed=1) != splits
    ds = make_datasets(50, seed=0)
    for k, d in ds.items():
        assert {w.user_id for w in d.windows} == ids[k]


def test_dataset_yields_tensors_of_the_ground_truth() -> None:
    us = make_users(6, seed=4, noise_rates=0.4)
    ds = PigeonDataset(us, seed=4)
    item = ds[3]
    assert item["history"].shape == (5, 3, 32, 32) and item["history"].dtype == torch.float32
    assert item["reference"].shape == item["target"].shape == (3, 32, 32)
    assert item["history"].min() >= -1 and item["history"].max() <= 1
    assert item["history_is_noise"].dtype == torch.bool and int(item["history_is_noise"].sum()) == 2
    w = ds.window(3)
    assert item["instruction"] == w.instruction and int(item["start"]) == w.start
    # the target image is the target scene rendered with its own generator
    rng = np.random.default_rng([4, w.user_id, w.start + 5, 0])
    expected = torch.from_numpy(render(w.target, rng=rng)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["target"], expected)
    # one interaction is one image in every window that holds it
    nxt = next(i for i in range(len(ds)) if ds.window(i).user_id == w.user_id and ds.window(i).start > w.start)
    shift = ds.window(nxt).start - w.start
    if shift < 5:
        assert torch.equal(ds[nxt]["history"][: 5 - shift], item["history"][shift:])
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["history"].shape == (4, 5, 3, 32, 32) and len(batch["instruction"]) == 4
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.skipif(not (SHAPESWORLD_DIR / "oracle" / "config.json").exists(), reason="oracle not shipped")
def test_oracle_reads_the_taste_in_liked_images(oracle) -> None:
    ds = PigeonDataset(make_users(6, seed=5, noise_rates=0.2), seed=5)
    n = 12
    windows = [ds.window(i) for i in range(n)]
    targets = np.stack([ds.images(i)["target"] for i in range(n)])
    refs = np.stack([ds.images(i)["reference"] for i in range(n)])
    rep = taste_report(oracle.read(targets), windows)
    assert rep["all"] == 1.0, rep
    assert taste_report(oracle.read(refs), windows)["taste"] == 0.0  # references never carry the whole taste


def test_taste_report_hand_made() -> None:
    ds = PigeonDataset(make_users(3, seed=0, noise_rates=0.0), seed=0)
    w = ds.window(0)
    pos, obj = w.target.position, w.target.obj
    good = {"background": w.taste.background, pos: {"shape": obj.shape, "color": w.taste.colors[-1],
                                                     "texture": w.taste.texture, "size": obj.size}}
    other_bg = next(b for b in BACKGROUNDS if b != w.taste.background)
    wrong_shape = next(s for s in SHAPES if s != obj.shape)
    bad = {"background": other_bg, pos: {**good[pos], "shape": wrong_shape}}
    empty = {"background": w.taste.background}
    rep = taste_report([good, bad, empty], [w, w, w])
    assert rep["all"] == pytest.approx(1 / 3) and rep["shape"] == pytest.approx(1 / 3)
    assert rep["color"] == pytest.approx(2 / 3) and rep["background"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one reading per window"):
        taste_report([good], [w, w])
    # the right object in the wrong slot: a miss when strict, a hit when judged anywhere
    elsewhere = next(q for q in ("left", "center", "right") if q != pos)
    moved = {"background": w.taste.background, elsewhere: good[pos]}
    assert taste_report([moved], [w])["all"] == 0.0
    assert taste_report([moved], [w], anywhere=True) == {k: 1.0 for k in
                                                         ("shape", "color", "texture", "background", "taste", "all")}
    assert taste_report([good, bad, empty], [w, w, w], anywhere=True) == rep


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("rate, match", [(-0.1, r"outside \[0, 1\]"), (1.5, r"outside \[0, 1\]"),
                                         (0.3, "not a whole number.*use one of 0, 0.2"), (float("nan"), "a number")])
def test_bad_noise_rate(rate: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_user(0, noise_rate=rate)
    with pytest.raises(ValueError, match=match):
        make_users(3, noise_rates=(0.0, rate))


def test_bad_user_settings() -> None:
    with pytest.raises(ValueError, match="n_interactions >= 11"):
        make_user(0, n_interactions=6)
    with pytest.raises(ValueError, match="1 or 2 distinct colors"):
        Taste(("red", "blue", "green"), "plain", "gray")
    with pytest.raises(ValueError, match="unknown texture"):
        Taste(("red",), "furry", "gray")
    with pytest.raises(ValueError, match="summing to 1"):
        split_users(make_users(5), (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="users is empty"):
        PigeonDataset([])


def test_validate_request_accepts_the_usual_formats() -> None:
    ds = PigeonDataset(make_users(2, seed=0), seed=0)
    im = ds.images(0)
    h, r, t = validate_request(im["history"], im["reference"], "a circle")  # uint8 channels-last, one request
    assert h.shape == (1, 5, 3, 32, 32) and r.shape == (1, 3, 32, 32) and t == ["a circle"]
    item = ds[0]
    h2, r2, _ = validate_request(item["history"], item["reference"], "a circle", reference_ratio=0.5)
    assert torch.equal(h, h2) and torch.equal(r, r2)
    pil_history = [Image.fromarray(x) for x in im["history"]]
    h3, _, _ = validate_request(pil_history, np.asarray(Image.fromarray(im["reference"])), "a circle")
    assert torch.equal(h, h3)
    hist3 = item["history"][None].expand(3, -1, -1, -1, -1)
    ref3 = item["reference"][None].expand(3, -1, -1, -1)
    hb, rb, tb = validate_request(hist3, ref3, ["a", "b", "c"], reference_ratio=torch.tensor([0.0, 0.5, 1.0]))
    assert hb.shape[0] == rb.shape[0] == len(tb) == 3


def test_validate_request_errors_say_what_to_do() -> None:
    ds = PigeonDataset(make_users(2, seed=0), seed=0)
    item = ds[0]
    hist, ref = item["history"], item["reference"]
    with pytest.raises(ValueError, match="history has 4 images but Pigeon reads exactly 5.*pass 5"):
        validate_request(hist[:4], ref, "a circle")
    big = torch.zeros(5, 3, 64, 64)
    with pytest.raises(ValueError, match="64x64 but the models take 32x32; resize"):
        validate_request(big, ref, "a circle")
    with pytest.raises(ValueError, match="reference images are 16x16"):
        validate_request(hist, torch.zeros(3, 16, 16), "a circle")
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="is empty; name the content to generate, e.g. 'a triangle'"):
            validate_request(hist, ref, empty)
    with pytest.raises(ValueError, match="is empty"):
        validate_request(hist[None].expand(2, -1, -1, -1, -1), ref[None].expand(2, -1, -1, -1), ["a circle", ""])
    for bad in (-0.5, 1.2, float("nan")):
        with pytest.raises(ValueError, match="reference_ratio"):
            validate_request(hist, ref, "a circle", reference_ratio=bad)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*fraction of reference tokens masked"):
        check_ratio(1.5)
    with pytest.raises(ValueError, match="batch sizes differ"):
        validate_request(hist, ref, ["a circle", "a square"])
    with pytest.raises(ValueError, match="numpy images must be uint8"):
        validate_request(np.zeros((5, 32, 32, 3), np.float32), ref, "a circle")
    with pytest.raises(ValueError, match="different sizes"):
        validate_request([np.zeros((32, 32, 3), np.uint8)] * 4 + [np.zeros((16, 16, 3), np.uint8)], ref, "a circle")

"""Token-level noise (persviz.pigeon.users regime "token") and the mask measures against it (persviz.pigeon.measures).

The per-token ground truth is checked against the distractors' own geometry (shape_mask at the renderer's
supersampling, computed here independently of render_layers), the measured noise rates against the requested ones,
the measures against hand-worked values and scikit-learn's roc_auc_score. CPU, one thread, a few seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from persviz.paths import SHAPESWORLD_DIR
from persviz.pigeon import measures as ms
from persviz.pigeon.users import (DEFAULT_TOKEN_NOISE_RATES, HISTORY_LEN, MAX_TOKEN_NOISE_RATE, TOKEN_GRID,
                                  PigeonDataset, Taste, distractor_layouts, make_user, make_users, place_distractors,
                                  token_counts, token_shares)
from persviz.shapesworld.render import SUPERSAMPLE, render, render_layers, shape_mask
from persviz.shapesworld.scene import IMAGE_SIZE, Obj, Scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_USERS = 24


@pytest.fixture(scope="module")
def token_sets():
    return {r: PigeonDataset(make_users(N_USERS, seed=0, noise_rates=r, regime="token"), seed=0)
            for r in DEFAULT_TOKEN_NOISE_RATES}


def _geometry_shares(placed, size=IMAGE_SIZE):
    """Share of each token's patch covered by the placed objects, from shape_mask alone."""
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(c, c, indexing="xy")
    m = np.zeros((n, n), bool)
    for p in placed:
        m |= shape_mask(p.obj.shape, (x - p.cx) / p.radius, (y - p.cy) / p.radius)
    p = n // TOKEN_GRID
    return m.reshape(TOKEN_GRID, p, TOKEN_GRID, p).mean(axis=(1, 3)).reshape(-1)


# ---------------------------------------------------------------- the regime
def test_token_noise_rates_hit_the_requested_ones(token_sets) -> None:
    # requested 0 / 0.2 / 0.4: measured over every window 0 / 0.197 / 0.394 (data seed 0); each window within 0.03
    for rate, ds in token_sets.items():
        per_window = np.array([ds.history_tokens(i).mean() for i in range(len(ds))])
        assert len(ds) == N_USERS * (12 - HISTORY_LEN)  # every interaction is liked: every window is usable
        assert abs(ds.token_noise_rate() - rate) <= 0.01, (rate, ds.token_noise_rate())
        assert np.abs(per_window - rate).max() <= 0.03, (rate, per_window.min(), per_window.max())
        if rate == 0:
            assert per_window.max() == 0
    assert ds.token_noise_rate(range(3)) == pytest.approx(np.mean([ds.history_tokens(i).mean() for i in range(3)]))


def test_distractor_tokens_are_the_patches_a_distractor_covers_at_least_half(token_sets) -> None:
    ds = token_sets[0.4]
    checked = 0
    for u in list(ds.users.values())[:6]:
        for j in range(len(u.scenes)):
            placed = u.distractors_of(j)
            shares = _geometry_shares(placed)
            labels = ds.distractor_tokens(u.user_id, j)
            assert np.array_equal(labels, shares >= 0.5), (u.user_id, j, shares)
            assert np.all(np.abs(shares - 0.5) > 1 / 64)  # no borderline patch
            # the liked object never covers a distractor pixel: the visible distractor area is the geometric one
            rng = np.random.default_rng([0, u.user_id, j, 0])
            img, cover = render_layers(u.scenes[j], placed, rng=rng)
            assert np.allclose(token_shares(cover[:len(placed)].sum(0)), shares)
            assert np.array_equal(img, ds.image(u.user_id, j))
            assert not np.array_equal(img, ds.image(u.user_id, j, clean=True)) or not placed
            checked += int(labels.sum())
    assert checked > 100


def test_history_images_carry_the_liked_object_beside_unliked_distractors(token_sets) -> None:
    ds = token_sets[0.2]
    for u in ds.users.values():
        assert u.regime == "token" and not any(u.is_noise)
        for j, scene in enumerate(u.scenes):
            assert scene.position in ("left", "right") and scene.second is None
            assert u.taste.matches(scene.obj, scene.background)
            for p in u.distractors_of(j):
                assert p.obj.color not in u.taste.colors and p.obj.texture != u.taste.texture
                assert (p.cx > 0.5) == (scene.position == "left")  # in the half the liked object leaves free
    # the target is the liked image without its distractors: the renderer's image of the scene alone
    i = 3
    w = ds.window(i)
    t = w.start + HISTORY_LEN
    rng = np.random.default_rng([0, w.user_id, t, 0])
    assert np.array_equal(ds.images(i)["target"], render(w.target, rng=rng))
    item = ds[i]
    assert item["history_distractor_tokens"].shape == (HISTORY_LEN, TOKEN_GRID ** 2)
    assert item["history_distractor_tokens"].dtype == torch.bool and not item["history_is_noise"].any()
    assert torch.equal(item["history_distractor_tokens"], torch.from_numpy(ds.history_tokens(i)))
    assert w.history_distractors == tuple(ds.users[w.user_id].distractors_of(j) for j in range(w.start, t))


def test_the_image_regime_is_unchanged_and_the_users_keep_their_taste() -> None:
    image = make_users(6, seed=2)
    assert image == make_users(6, seed=2, noise_rates=(0.0, 0.2, 0.4, 0.6), regime="image")
    assert all(u.regime == "image" and u.distractors == () for u in image)
    token = make_users(6, seed=2, noise_rates=0.2, regime="token")
    assert [u.taste for u in token] == [u.taste for u in image]
    assert make_users(6, seed=2, noise_rates=0.2, regime="token") == token  # deterministic
    ds = PigeonDataset(image[:2])
    assert not any(ds[i]["history_distractor_tokens"].any() for i in range(len(ds)))
    assert make_users(3, regime="token")[0].noise_rate == DEFAULT_TOKEN_NOISE_RATES[0]


def test_token_counts_and_placements() -> None:
    rng = np.random.default_rng(0)
    for rate in (0.0, 0.2, 0.4, 0.5):
        c = token_counts(rate, rng)
        assert len(c) == HISTORY_LEN + 1 and max(c) - min(c) <= 1
        assert sum(c) == round(rate * 16 * 6)
        assert all(abs((sum(c) - x) / 80 - rate) <= 1 / 80 + 1e-9 for x in c)  # every window
    layouts = distractor_layouts()
    assert set(layouts) == {1, 2, 3, 4} and all(len(v) for v in layouts.values())
    taste = Taste(("red",), "plain", "black")
    liked = Scene(Obj("circle", "red", "plain", "small"), "black", "right")
    for n in range(9):
        placed = place_distractors(liked, taste, n, np.random.default_rng(n))
        assert (_geometry_shares(placed) >= 0.5).sum() == n
        assert all(p.cx < 0.5 for p in placed)
    assert np.allclose(token_shares(np.pad(np.ones((8, 8)), ((0, 24), (0, 24)))), np.eye(16)[0])


def test_bad_token_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=f"outside \\[0, {MAX_TOKEN_NOISE_RATE}\\]"):
        make_users(3, noise_rates=0.6, regime="token")
    with pytest.raises(ValueError, match="regime"):
        make_user(0, regime="pixel")
    with pytest.raises(ValueError, match="left' or 'right"):
        place_distractors(Scene(Obj("circle", "red")), Taste(("red",), "plain", "black"), 3,
                          np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_tokens"):
        place_distractors(Scene(Obj("circle", "red"), position="left"), Taste(("red",), "plain", "black"), 9,
                          np.random.default_rng(0))


def test_the_token_grid_is_the_shapesworld_clips_patch_grid() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel  # heavy: transformers
    cfg = json.loads((SHAPESWORLD_DIR / "clip" / "config.json").read_text())["vision_config"]
    assert cfg["image_size"] == IMAGE_SIZE and cfg["image_size"] // cfg["patch_size"] == TOKEN_GRID
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**{k: cfg[k] for k in ("image_size", "patch_size")}, hidden_size=16,
                                              intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    emb = getattr(vision, "vision_model", vision).embeddings  # transformers 4 nests it, 5 does not
    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = x.clone()
    y[:, :, 8:16, 16:24] = 1.0  # the patch of row 1, column 2
    with torch.no_grad():
        d = (emb(y) - emb(x))[0, 1:].abs().sum(-1)  # the class token first, then the patch tokens
    assert torch.nonzero(d).flatten().tolist() == [1 * TOKEN_GRID + 2]  # row-major, as the labels


# ---------------------------------------------------------------- the measures
def test_kept_noise_shares_by_hand() -> None:
    noise = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)   # 2 images of 5 tokens
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 0, 1]])                    # 3 and 4 kept
    assert ms.kept_noise_share(keep, noise) == pytest.approx((2 + 1) / 7)
    # ratio 0.4: k = 3 kept per image. Image 0 has 3 distractors, drops 2 -> keeps 1; image 1 drops its one
    perfect = ms.perfect_keep_mask(noise, 0.4)
    assert perfect.sum(-1).tolist() == [3, 3]
    assert perfect.tolist() == [[True, False, False, True, True], [True, True, True, False, False]]
    assert ms.perfect_kept_noise_share(noise, 0.4) == pytest.approx(1 / 6)
    assert ms.chance_kept_noise_share(noise) == pytest.approx(4 / 10)
    assert ms.keep_count(16, 0.2) == 12 and ms.keep_count(16, 1.0) == 1
    # the chance level is what random per-image top-k masks keep on average
    g = torch.Generator().manual_seed(0)
    big = torch.rand(400, 16, generator=g) < 0.3
    rand_keep = ms.perfect_keep_mask(torch.rand(400, 16, generator=g) < 0.5, 0.2)[torch.randperm(400, generator=g)]
    assert abs(ms.kept_noise_share(rand_keep, big) - ms.chance_kept_noise_share(big)) < 0.02
    assert np.isnan(ms.kept_noise_share(torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="same shape"):
        ms.kept_noise_share(torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="ratio"):
        ms.perfect_keep_mask(noise, 1.5)


def test_token_auc_by_hand_and_against_scikit_learn() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.8, 0.4]])
    noise = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    # image 0: taste {0.9, 0.5} over noise {0.1, 0.3}: 4 of 4 pairs -> 1; image 1: taste {0.2, 0.8, 0.4} over
    # {0.2}: a tie and two wins -> (0.5 + 1 + 1) / 3
    assert ms.token_aucs(scores, noise).tolist() == pytest.approx([1.0, 2.5 / 3])
    assert ms.token_auc(scores, noise) == pytest.approx((1 + 2.5 / 3) / 2)
    assert ms.token_auc(scores, noise, per="all") == pytest.approx(roc_auc_score(~noise.flatten(), scores.flatten()))
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, 16, generator=g).round(decimals=1)  # ties included
    m = torch.rand(6, 5, 16, generator=g) < 0.25
    per_image = [roc_auc_score(~m[i, h], s[i, h]) for i in range(6) for h in range(5) if 0 < m[i, h].sum() < 16]
    assert ms.token_auc(s, m, per="image") == pytest.approx(np.mean(per_image))
    assert ms.token_auc(s, m, per="window") == pytest.approx(np.mean([roc_auc_score(~m[i].flatten(),
                                                                                    s[i].flatten()) for i in range(6)]))
    assert ms.token_auc(s, m, per="all") == pytest.approx(roc_auc_score(~m.flatten(), s.flatten()))
    assert ms.token_auc(-s, m, per="all") == pytest.approx(1 - roc_auc_score(~m.flatten(), s.flatten()))
    assert np.isnan(ms.token_auc(s, torch.zeros_like(m)))
    w = ms.window_measures(ms.perfect_keep_mask(m, 0.2), s, m, 0.2)
    assert w["kept_noise_share"] == pytest.approx(w["perfect"])
    assert np.mean(w["noise_rate"]) == pytest.approx(float(m.float().mean()))
    with pytest.raises(ValueError, match="per="):
        ms.token_auc(s, m, per="token")

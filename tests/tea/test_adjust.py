"""TEA adjustment math: hand-worked SLERP examples, geometry, alignment of prompt positions, errors."""
import math

import numpy as np
import pytest
import torch

from persviz.tea.adjust import DEFAULTS, align_positions, prompt_level_adjust, slerp_adjust

BOS, EOS = 49406, 49407
A, PHOTO, OF, MAN, ON, BEACH, SKS = 320, 1125, 539, 786, 525, 2117, 48136


def _close(a, b, tol=1e-12):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=0, atol=tol)


def _literal_eq1(v, c, rotation, scale):
    """docs/tea.md Eq. 1 written out for one vector pair in numpy, with arccos as printed."""
    v, c = np.asarray(v, dtype=np.float64), np.asarray(c, dtype=np.float64)
    nv, nc = np.linalg.norm(v), np.linalg.norm(c)
    m = (1 - scale) * nv + scale * nc
    v1, c1 = m * v / nv, m * c / nc
    theta = math.acos(min(1.0, max(-1.0, float(v @ c) / (nv * nc))))
    if math.sin(theta) < 1e-6:
        return (1 - rotation) * v1 + rotation * c1
    s = math.sin(theta)
    return math.sin((1 - rotation) * theta) / s * v1 + math.sin(rotation * theta) / s * c1


# ----------------------------------------------------------------------------- slerp_adjust


def test_right_angle_at_half_rotation_gives_the_bisector_with_the_interpolated_norm():
    v, c = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    out = slerp_adjust(v, c, rotation=0.5, scale=0.5)  # m = 0.5 * 3 + 0.5 * 1 = 2
    _close(out, [math.sqrt(2), math.sqrt(2)], 1e-6)
    # a quarter of the way: 22.5 degrees from v, norm 2.5 (scale 0.25)
    out = slerp_adjust(v, c, rotation=0.25, scale=0.25)
    _close(out, [2.5 * math.cos(math.pi / 8), 2.5 * math.sin(math.pi / 8)], 1e-6)


def test_rotation_zero_keeps_the_direction_and_one_takes_the_class_direction():
    g = torch.Generator().manual_seed(0)
    v, c = torch.randn(2, 768, generator=g, dtype=torch.float64)
    v, c = 0.4 * v, 1.7 * c
    for scale in (0.0, 0.3, 1.0):
        m = (1 - scale) * v.norm() + scale * c.norm()
        _close(slerp_adjust(v, c, 0.0, scale), m * v / v.norm())
        _close(slerp_adjust(v, c, 1.0, scale), m * c / c.norm())
    _close(slerp_adjust(v, c, 0.0, 0.0), v)  # identity
    _close(slerp_adjust(v, c, 1.0, 1.0), c)  # full replacement by the class word


def test_output_stays_on_the_great_circle_at_the_right_angles():
    g = torch.Generator().manual_seed(1)
    v, c = torch.randn(2, 64, generator=g, dtype=torch.float64)
    theta = math.acos(float(v @ c / (v.norm() * c.norm())))
    for rotation in (0.1, 0.2, 0.5, 0.9):
        out = slerp_adjust(v, c, rotation, 0.5)
        cos_v = float(out @ v / (out.norm() * v.norm()))
        cos_c = float(out @ c / (out.norm() * c.norm()))
        assert math.acos(cos_v) == pytest.approx(rotation * theta, abs=1e-9)
        assert math.acos(cos_c) == pytest.approx((1 - rotation) * theta, abs=1e-9)
        assert float(out.norm()) == pytest.approx(0.5 * float(v.norm() + c.norm()), rel=1e-12)


def test_batched_broadcasting_matches_the_literal_formula_per_vector():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 5, 16, generator=g)
    c = torch.randn(16, generator=g)
    out = slerp_adjust(v, c, 0.2, 0.5)
    assert out.shape == (2, 5, 16) and out.dtype == torch.float32
    for idx in np.ndindex(2, 5):
        _close(out[idx], _literal_eq1(v[idx].numpy(), c.numpy(), 0.2, 0.5), 1e-5)


def test_parallel_vectors_use_the_linear_blend_without_nan():
    v = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)  # |v| = 3
    for c in (2 * v, v * (1 + 1e-14) + torch.tensor([0.0, 1e-13, 0.0], dtype=torch.float64)):
        out = slerp_adjust(v, c, 0.3, 0.5)
        m = 0.5 * 3 + 0.5 * float(c.norm())
        assert torch.isfinite(out).all()
        _close(out, m * v / 3, 1e-9)


def test_antiparallel_vectors_raise_unless_rotation_is_zero_or_one():
    v = torch.tensor([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"opposite directions.*another class word"):
        slerp_adjust(v, -2 * v, 0.2, 0.5)
    with pytest.raises(ValueError, match=r"opposite directions"):
        slerp_adjust(torch.stack([v, torch.tensor([0.0, 1.0, 0.0])]), -v, 0.5, 0.0)
    _close(slerp_adjust(v, -2 * v, 0.0, 0.5), [1.5, 0, 0], 1e-7)
    _close(slerp_adjust(v, -2 * v, 1.0, 0.5), [-1.5, 0, 0], 1e-7)


def test_low_precision_inputs_keep_their_dtype():
    v = torch.tensor([[3.0, 0.0]], dtype=torch.float16)
    c = torch.tensor([[0.0, 1.0]], dtype=torch.float16)
    out = slerp_adjust(v, c, 0.5, 0.5)
    assert out.dtype == torch.float16
    _close(out.float(), [[math.sqrt(2), math.sqrt(2)]], 2e-3)


def test_defaults_are_the_papers_knobs_and_read_only():
    assert dict(DEFAULTS["textual_inversion"]) == {"rotation": 0.2, "scale": 0.5}
    assert dict(DEFAULTS["dreambooth"]) == {"rotation": 0.1, "scale": 0.5}
    assert dict(DEFAULTS["custom_diffusion"]) == {"rotation": 0.2, "scale": 0.5}
    v, c = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    _close(slerp_adjust(v, c, **DEFAULTS["dreambooth"]), _literal_eq1(v, c, 0.1, 0.5), 1e-6)
    with pytest.raises(TypeError):
        DEFAULTS["dreambooth"]["rotation"] = 0.9  # type: ignore[index]


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan"), float("inf"), True, "0.2", None])
def test_knobs_outside_the_unit_interval_are_rejected(bad):
    v, c = torch.ones(4), torch.arange(4.0) + 1
    with pytest.raises(ValueError, match=r"rotation must be a number in \[0, 1\]"):
        slerp_adjust(v, c, bad, 0.5)
    with pytest.raises(ValueError, match=r"scale must be a number in \[0, 1\]"):
        slerp_adjust(v, c, 0.2, bad)


def test_bad_vectors_are_rejected_with_the_reason():
    v, c = torch.ones(2, 4), torch.arange(4.0) + 1
    with pytest.raises(ValueError, match=r"v has zero norm at \[\[1\]\]"):
        slerp_adjust(torch.stack([torch.ones(4), torch.zeros(4)]), c, 0.2, 0.5)
    with pytest.raises(ValueError, match=r"c has zero norm"):
        slerp_adjust(v, torch.zeros(4), 0.2, 0.5)
    with pytest.raises(ValueError, match=r"v contains NaN or inf"):
        slerp_adjust(torch.tensor([1.0, float("nan"), 0, 0]), c, 0.2, 0.5)
    with pytest.raises(ValueError, match=r"c contains NaN or inf"):
        slerp_adjust(v, torch.tensor([1.0, float("inf"), 0, 0]), 0.2, 0.5)
    with pytest.raises(ValueError, match=r"same embedding size D"):
        slerp_adjust(v, torch.ones(5), 0.2, 0.5)
    with pytest.raises(ValueError, match=r"do not broadcast"):
        slerp_adjust(torch.ones(3, 4), torch.ones(2, 4), 0.2, 0.5)
    with pytest.raises(ValueError, match=r"\[\.\.\., D\]"):
        slerp_adjust(torch.tensor(1.0), torch.tensor(2.0), 0.2, 0.5)


# ----------------------------------------------------------------------------- align_positions

CLASS = [BOS, A, PHOTO, OF, MAN, ON, A, BEACH, EOS] + [EOS] * 4  # "a photo of man on a beach", padded to 13


def test_dreambooth_prompt_pairs_sks_and_man_with_the_class_token_and_shifts_the_rest():
    personal = [BOS, A, PHOTO, OF, SKS, MAN, ON, A, BEACH, EOS] + [EOS] * 3  # "a photo of sks man on a beach"
    pairs = align_positions(personal, CLASS, SKS, MAN)
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (6, 5), (7, 6), (8, 7), (9, 8),
                     (10, 9), (11, 10), (12, 11)]
    assert all(CLASS[j] == personal[i] for i, j in pairs if i not in (4,))  # same token except the placeholder


def test_textual_inversion_prompt_replaces_the_class_word_and_keeps_positions():
    personal = [BOS, A, PHOTO, OF, SKS, ON, A, BEACH, EOS] + [EOS] * 4  # "a photo of <V*> on a beach"
    assert align_positions(torch.tensor(personal), torch.tensor(CLASS), [SKS], MAN) == [(k, k) for k in range(13)]


def test_multi_token_placeholder_and_unpadded_lists():
    v1, v2 = 49408, 49409
    personal = [BOS, A, PHOTO, OF, v1, v2, MAN, ON, A, BEACH, EOS]
    pairs = align_positions(personal, CLASS[:9], [v1, v2], MAN)
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (6, 4), (7, 5), (8, 6), (9, 7), (10, 8)]
    replaced = [BOS, A, PHOTO, OF, v1, v2, ON, A, BEACH, EOS, EOS, EOS, EOS]
    pairs = align_positions(replaced, CLASS, [v1, v2], MAN)
    assert pairs[4:7] == [(4, 4), (5, 4), (6, 5)] and pairs[-1] == (12, 11)


def test_alignment_errors_say_what_to_fix():
    personal = [BOS, A, PHOTO, OF, SKS, MAN, ON, A, BEACH, EOS]
    with pytest.raises(ValueError, match=r"placeholder ids \[7\] do not occur.*tokenizer"):
        align_positions(personal, CLASS, 7, MAN)
    with pytest.raises(ValueError, match=r"class_id 999 does not occur in ids_class"):
        align_positions([BOS, SKS, EOS], [BOS, 5, EOS], SKS, 999)
    with pytest.raises(ValueError, match=r"does not match the class prompt.*identical apart from the placeholder"):
        align_positions([BOS, A, PHOTO, OF, SKS, MAN, ON, A, PHOTO, EOS], CLASS, SKS, MAN)
    with pytest.raises(ValueError, match=r"placeholder_ids is empty"):
        align_positions(personal, CLASS, [], MAN)
    with pytest.raises(ValueError, match=r"one prompt's token ids"):
        align_positions(torch.tensor([personal]), CLASS, SKS, MAN)


# ----------------------------------------------------------------------------- prompt_level_adjust


def _hidden(B, L, D=8, seed=3):
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))


def test_unaligned_prompt_adjustment_pairs_position_k_with_k():
    hp, hc = _hidden(2, 13), _hidden(2, 13, seed=4)
    out = prompt_level_adjust(hp, hc, 0.1, 0.5)
    _close(out, slerp_adjust(hp, hc, 0.1, 0.5), 0)
    with pytest.raises(ValueError, match=r"needs equal lengths.*align_positions"):
        prompt_level_adjust(hp, _hidden(2, 12), 0.1, 0.5)


def test_aligned_prompt_adjustment_follows_the_pairs():
    personal = [BOS, A, PHOTO, OF, SKS, MAN, ON, A, BEACH, EOS] + [EOS] * 3
    pairs = align_positions(personal, CLASS, SKS, MAN)
    hp, hc = _hidden(2, 13), _hidden(1, 13, seed=5)  # class states broadcast over the batch
    out = prompt_level_adjust(hp, hc, 0.1, 0.5, pairs=pairs)
    assert out.shape == hp.shape
    for b in range(2):
        for i, j in pairs:
            _close(out[b, i], slerp_adjust(hp[b, i], hc[0, j], 0.1, 0.5), 1e-6)
    # rotation 1, scale 1 at the aligned positions reproduces the class states: "sks" and "man" -> "man"
    full = prompt_level_adjust(hp, hc, 1.0, 1.0, pairs=pairs)
    _close(full[0, 4], hc[0, 4], 1e-6)
    _close(full[0, 6], hc[0, 5], 1e-6)


def test_positions_left_out_of_pairs_are_unchanged_and_rows_may_differ():
    hp, hc = _hidden(2, 6), _hidden(2, 6, seed=6)
    out = prompt_level_adjust(hp, hc, 0.5, 0.5, pairs=[[(1, 2)], [(0, 0), (3, 5)]])
    _close(out[0, 1], slerp_adjust(hp[0, 1], hc[0, 2], 0.5, 0.5), 1e-6)
    _close(out[1, 3], slerp_adjust(hp[1, 3], hc[1, 5], 0.5, 0.5), 1e-6)
    untouched = [(0, k) for k in (0, 2, 3, 4, 5)] + [(1, k) for k in (1, 2, 4, 5)]
    for b, k in untouched:
        _close(out[b, k], hp[b, k], 0)


def test_prompt_adjustment_errors():
    hp, hc = _hidden(2, 6), _hidden(2, 6, seed=7)
    with pytest.raises(ValueError, match=r"out of range"):
        prompt_level_adjust(hp, hc, 0.5, 0.5, pairs=[(0, 6)])
    with pytest.raises(ValueError, match=r"paired twice"):
        prompt_level_adjust(hp, hc, 0.5, 0.5, pairs=[(0, 1), (0, 2)])
    with pytest.raises(ValueError, match=r"one list per batch row \(2\)"):
        prompt_level_adjust(hp, hc, 0.5, 0.5, pairs=[[(0, 1)]] * 3)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        prompt_level_adjust(hp[0], hc, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"\[B or 1, Lc, D\]"):
        prompt_level_adjust(hp, _hidden(3, 6), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"rotation must be"):
        prompt_level_adjust(hp, hc, 2.0, 0.5)

"""Unit tests of the FineXL core math (persviz.finexl.decompose) on planted, hand-checkable data. CPU, < 1 s."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from persviz.finexl.decompose import (Decomposition, concept_direction, decompose, divergence_vector, explain,
                            greedy_decompose, level_phrase, orthogonal_filter)

D, K = 64, 4
NOISE = 0.01  # per-coordinate std of the planted noise
TOL_W = 0.05  # stated tolerance: max |w_hat - w| < 0.05 at noise std 0.01 in D = 64


def planted_concepts(seed: int = 0) -> dict[str, torch.Tensor]:
    """K unit concept vectors in D = 64 sharing a common direction (pairwise cos ~ 0.36): not orthogonal."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=D)
    common /= np.linalg.norm(common)
    out = {}
    for i in range(K):
        g = rng.normal(size=D)
        g /= np.linalg.norm(g)
        f = 0.6 * common + 0.8 * g
        out[f"c{i}"] = torch.from_numpy(f / np.linalg.norm(f))
    return out


def matrix(concepts: dict[str, torch.Tensor]) -> np.ndarray:
    return np.stack([v.numpy() for v in concepts.values()], axis=1)


def planted(w: list[float], noise: float = NOISE, seed: int = 1):
    """(concepts, v_div = F w + noise, noise)."""
    concepts = planted_concepts()
    n = np.random.default_rng(seed).normal(scale=noise, size=D)
    return concepts, torch.from_numpy(matrix(concepts) @ np.array(w) + n), n


def basis(i: int, dim: int = D) -> torch.Tensor:
    e = torch.zeros(dim, dtype=torch.float64)
    e[i] = 1.0
    return e


# ----------------------------------------------------------------------------- planted decomposition


@pytest.mark.parametrize("method", ["lstsq", "whitened_nnls"])
def test_planted_decomposition_recovers_weights(method):
    w = np.array([0.6, 0.3, 0.2, 0.1])
    concepts, v, noise = planted(w.tolist())
    dec = decompose(v, concepts, method=method)
    assert isinstance(dec, Decomposition) and dec.method == method and dec.names == list(concepts)
    assert np.max(np.abs(dec.weights.numpy() - w)) < TOL_W
    # relative residual ~ |noise| / |v_div|: within 20% (the part of the noise inside span(F) is fitted away)
    expected = np.linalg.norm(noise) / np.linalg.norm(v.numpy())
    assert 0.8 * expected < dec.relative_residual < 1.05 * expected
    np.testing.assert_allclose(dec.residual.numpy(), v.numpy() - matrix(concepts) @ dec.weights.numpy(), atol=1e-12)


def test_lstsq_residual_is_the_noise_outside_the_concept_span():
    concepts, v, noise = planted([0.6, 0.3, -0.2, 0.1])
    dec = decompose(v, concepts, method="lstsq")
    q, _ = np.linalg.qr(matrix(concepts))
    outside = noise - q @ (q.T @ noise)
    assert dec.relative_residual == pytest.approx(np.linalg.norm(outside) / np.linalg.norm(v.numpy()), rel=1e-9)
    assert np.max(np.abs(dec.weights.numpy() - [0.6, 0.3, -0.2, 0.1])) < TOL_W


def test_lstsq_equals_numpy():
    concepts, v, _ = planted([0.6, 0.3, -0.2, 0.1])
    ref = np.linalg.lstsq(matrix(concepts), v.numpy(), rcond=None)[0]
    np.testing.assert_allclose(decompose(v, concepts).weights.numpy(), ref, rtol=0, atol=1e-12)


def test_nnls_noise_free_nonnegative_mixture_equals_scipy_and_truth():
    w = np.array([0.5, 0.0, 0.25, 0.4])
    concepts, v, _ = planted(w.tolist(), noise=0.0)
    dec = decompose(v, concepts, method="whitened_nnls")
    assert np.all(dec.weights.numpy() >= 0)
    np.testing.assert_allclose(dec.weights.numpy(), nnls(matrix(concepts), v.numpy())[0], atol=1e-9)
    np.testing.assert_allclose(dec.weights.numpy(), w, atol=1e-9)
    assert dec.relative_residual < 1e-9


def test_nnls_equals_scipy_on_the_whitened_system_when_constraints_bind():
    concepts, v, _ = planted([0.6, 0.3, -0.2, 0.1])  # one negative weight: NNLS must clip it
    dec = decompose(v, concepts, method="whitened_nnls")
    u, s, vt = np.linalg.svd(matrix(concepts), full_matrices=False)
    assert s[-1] > 1e-2 * s[0]  # full rank kept by the truncated PCA
    ref = nnls(vt, (u.T @ v.numpy()) / s)[0]
    w_hat = dec.weights.numpy()
    assert np.all(w_hat >= 0) and w_hat[2] == 0.0
    np.testing.assert_allclose(w_hat, ref, atol=1e-10)


def test_whitened_nnls_truncates_a_near_duplicate_direction():
    f = planted_concepts()
    f["dup"] = f["c0"] + 1e-4 * basis(0)  # near-duplicate: a singular value ~1e-4 of the largest
    _, v, _ = planted([0.6, 0.3, 0.2, 0.1])
    dec = decompose(v, f, method="whitened_nnls")
    w = dec.as_dict()
    assert np.all(dec.weights.numpy() >= 0)
    assert abs(w["c0"] + w["dup"] - 0.6) < TOL_W  # the pair shares the weight, no blow-up
    assert dec.relative_residual < 0.2
    assert abs(decompose(v, f, method="lstsq").as_dict()["c0"]) > 1  # while plain lstsq blows up


# ----------------------------------------------------------------------------- greedy stopping rule


def test_greedy_stops_at_first_step_below_e_decomp():
    concepts = {"a": basis(0), "b": basis(1), "c": basis(2), "d": basis(3)}
    v = 0.9 * basis(0) + 0.5 * basis(1) + 0.1 * basis(2)
    norm = float(v.norm())
    dec, trace = greedy_decompose(v, concepts, e_decomp=0.2)
    assert dec.names == ["a", "b"] and dec.within_bound
    assert trace == pytest.approx([np.sqrt(0.26) / norm, 0.1 / norm])
    assert trace[0] >= 0.2 > trace[1]
    np.testing.assert_allclose(dec.weights.numpy(), [0.9, 0.5], atol=1e-12)


def test_greedy_uses_given_order_and_reports_when_bound_never_met():
    concepts = {"a": basis(0), "b": basis(1)}
    v = basis(0) + basis(1) + basis(2)  # basis(2) is never explained: e >= 1/sqrt(3)
    dec, trace = greedy_decompose(v, concepts, order=["b", "a"], e_decomp=0.2, method="whitened_nnls")
    assert dec.names == ["b", "a"] and len(trace) == 2 and not dec.within_bound
    assert trace[-1] == pytest.approx(1 / np.sqrt(3))


# ----------------------------------------------------------------------------- orthogonality filter


def test_filter_keeps_an_orthogonal_set_ordered_by_relevance():
    concepts = {"a": basis(0), "b": 2 * basis(1), "c": basis(2), "d": -basis(3)}
    v = 0.1 * basis(0) + 0.3 * basis(1) + 0.2 * basis(2) + 0.5 * basis(3)
    assert orthogonal_filter(v, concepts, eps_ortho=0.03) == ["d", "b", "c", "a"]


def test_filter_rejects_a_near_duplicate():
    near = basis(0) + 0.05 * basis(1)
    concepts = {"a": basis(0), "a2": near, "b": basis(2)}
    v = basis(0) + 0.5 * basis(2)
    assert orthogonal_filter(v, concepts) == ["a", "b"]


def test_filter_threshold_and_signed_sum():
    slightly = torch.from_numpy(np.r_[0.05, np.sqrt(1 - 0.05 ** 2), np.zeros(D - 2)])  # cos 0.05 with basis(0)
    v = basis(0) + 0.1 * basis(1)
    assert orthogonal_filter(v, {"a": basis(0), "s": slightly}, eps_ortho=0.1) == ["a", "s"]
    assert orthogonal_filter(v, {"a": basis(0), "s": slightly}, eps_ortho=0.03) == ["a"]
    # the signed sum: cos +0.3 with one kept concept and -0.3 with another cancel out
    x, y = basis(0), basis(1)
    z = torch.from_numpy(np.r_[0.3, -0.3, np.sqrt(1 - 0.18), np.zeros(D - 3)])
    assert orthogonal_filter(3 * x + 2 * y, {"x": x, "y": y, "z": z}, eps_ortho=0.03) == ["x", "y", "z"]


def test_filter_skips_zero_vectors_and_raises_if_none_survive():
    assert orthogonal_filter(basis(0), {"zero": torch.zeros(D, dtype=torch.float64), "a": basis(1)}) == ["a"]
    with pytest.raises(ValueError, match="no candidate concept survived"):
        orthogonal_filter(basis(0), {"zero": torch.zeros(D, dtype=torch.float64)})


# ----------------------------------------------------------------------------- divergence and f(C)


def test_divergence_vector_matches_numpy():
    rng = np.random.default_rng(3)
    p, b = rng.normal(size=(7, 16)), rng.normal(size=(7, 16))
    d = p / np.linalg.norm(p, axis=1, keepdims=True) - b / np.linalg.norm(b, axis=1, keepdims=True)
    v, spread = divergence_vector(torch.tensor(p, dtype=torch.float32), torch.from_numpy(b))
    np.testing.assert_allclose(v.numpy(), d.mean(axis=0), atol=1e-6)
    assert spread == pytest.approx(np.linalg.norm(d.std(axis=0)), rel=1e-5)
    # spread = root-mean-square distance of one pair's difference from v_div
    assert spread == pytest.approx(np.sqrt(np.mean(np.sum((d - d.mean(axis=0)) ** 2, axis=1))), rel=1e-5)


def test_divergence_vector_is_scale_invariant_per_row():
    rng = np.random.default_rng(4)
    p, b = torch.from_numpy(rng.normal(size=(5, 8))), torch.from_numpy(rng.normal(size=(5, 8)))
    v1, s1 = divergence_vector(p, b)
    v2, s2 = divergence_vector(p * torch.arange(1, 6, dtype=torch.float64)[:, None], 3 * b)
    np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-12)
    assert s1 == pytest.approx(s2)


def fake_encoder(base: dict[str, np.ndarray], shift: dict[str, np.ndarray]):
    """Text encoder over known vectors: E(t) = base[t], E(t + ', ' + C) = base[t] + shift[C]."""
    def encode(texts: list[str]) -> torch.Tensor:
        rows = []
        for s in texts:
            t, _, c = s.partition(", ")
            rows.append(base[t] + (shift[c] if c else 0.0))
        return torch.tensor(np.stack(rows), dtype=torch.float32)
    return encode


def test_concept_direction_matches_hand_computation():
    rng = np.random.default_rng(5)
    base = {t: rng.normal(size=D) for t in ["a cat", "a house", "a tree"]}
    shift = {"striped": 0.5 * rng.normal(size=D)}
    f = concept_direction(fake_encoder(base, shift), list(base), "striped")
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    ref = np.mean([unit(base[t] + shift["striped"]) - unit(base[t]) for t in base], axis=0)
    assert f.shape == (D,) and f.dtype == torch.float64
    np.testing.assert_allclose(f.numpy(), ref, atol=1e-6)


def test_concept_direction_bad_inputs():
    base, shift = {"a cat": np.ones(D)}, {"striped": np.ones(D), "same": np.zeros(D)}
    enc = fake_encoder(base, shift)
    with pytest.raises(ValueError, match="probe_prompts must be a non-empty list"):
        concept_direction(enc, [], "striped")
    with pytest.raises(ValueError, match="probe_prompts must be a non-empty list"):
        concept_direction(enc, "a cat", "striped")
    with pytest.raises(ValueError, match="concept must be a non-empty string"):
        concept_direction(enc, ["a cat"], "  ")
    with pytest.raises(ValueError, match="did not move any probe"):
        concept_direction(enc, ["a cat"], "same")  # E(t, same) = E(t): zero direction
    with pytest.raises(ValueError, match="must return \\[N, D\\]"):
        concept_direction(lambda texts: torch.ones(1, D), ["a cat"], "striped")
    with pytest.raises(ValueError, match="NaN"):
        concept_direction(lambda texts: torch.full((2, D), float("nan")), ["a cat"], "striped")


# ----------------------------------------------------------------------------- bad inputs


def test_divergence_vector_bad_inputs():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="differ in shape.*paired samples"):
        divergence_vector(x, x[:3])
    with pytest.raises(ValueError, match="empty"):
        divergence_vector(torch.empty(0, 8), torch.empty(0, 8))
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        divergence_vector(bad, x)
    with pytest.raises(ValueError, match="look identical to the encoder.*personalized weights"):
        divergence_vector(x, 2 * x)  # same images up to scale
    with pytest.raises(ValueError, match="zero-norm rows \\[2\\]"):
        divergence_vector(x, torch.cat([x[:2], torch.zeros(1, 8), x[3:]]))
    with pytest.raises(ValueError, match="must be \\[N, D\\]"):
        divergence_vector(x[0], x[1])


def test_decompose_bad_inputs():
    concepts, v, _ = planted([0.6, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="concepts is empty.*concept_direction"):
        decompose(v, {})
    with pytest.raises(ValueError, match="dimension 32 but v_div has 64.*same CLIP model"):
        decompose(v, {**concepts, "short": torch.ones(32)})
    with pytest.raises(ValueError, match="'c9'.*NaN"):
        decompose(v, {**concepts, "c9": torch.full((D,), float("nan"))})
    with pytest.raises(ValueError, match="v_div.*NaN"):
        decompose(torch.full((D,), float("nan")), concepts)
    with pytest.raises(ValueError, match="zero norm.*look identical"):
        decompose(torch.zeros(D), concepts)
    with pytest.raises(ValueError, match="1-D vector"):
        decompose(v[None, :], concepts)
    with pytest.raises(ValueError, match="unknown method 'ridge'.*'lstsq', 'whitened_nnls'"):
        decompose(v, concepts, method="ridge")
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="e_decomp must be in \\(0, 1\\]"):
            decompose(v, concepts, e_decomp=bad)
    with pytest.raises(ValueError, match="whiten_rtol"):
        decompose(v, concepts, method="whitened_nnls", whiten_rtol=0.0)
    with pytest.raises(TypeError, match="dict"):
        decompose(v, list(concepts.values()))
    assert decompose(v, concepts, e_decomp=1.0).e_decomp == 1.0


def test_filter_and_greedy_bad_inputs():
    concepts, v, _ = planted([0.6, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="candidates is empty"):
        orthogonal_filter(v, {})
    with pytest.raises(ValueError, match="dimension 3 but v_div has 64"):
        orthogonal_filter(v, {"x": torch.ones(3)})
    with pytest.raises(ValueError, match="eps_ortho must be > 0"):
        orthogonal_filter(v, concepts, eps_ortho=0.0)
    with pytest.raises(ValueError, match="zero norm"):
        orthogonal_filter(torch.zeros(D), concepts)
    with pytest.raises(ValueError, match="not in concepts: \\['nope'\\]"):
        greedy_decompose(v, concepts, order=["c0", "nope"])
    with pytest.raises(ValueError, match="order is empty"):
        greedy_decompose(v, concepts, order=[])
    with pytest.raises(ValueError, match="unknown method"):
        greedy_decompose(v, concepts, method="nnls")
    with pytest.raises(ValueError, match="e_decomp must be in"):
        greedy_decompose(v, concepts, e_decomp=2.0)


# ----------------------------------------------------------------------------- sentences


def test_explain_sentences_exactly_as_documented():
    names = ["striped", "warm palette", "outlined", "round", "blurry", "dark", "tiny", "flat"]
    weights = [0.62, 0.18, -0.20, 0.03, -0.004, -0.5, 0.05, 0.4999]
    dec = Decomposition(names=names, weights=torch.tensor(weights, dtype=torch.float64),
                        residual=torch.zeros(D, dtype=torch.float64), relative_residual=0.1, method="lstsq")
    assert explain(dec) == [
        "much more striped (0.62)",
        "slightly more warm palette (0.18)",
        "less outlined (-0.20)",
        "no clear change in round (0.03)",
        "no clear change in blurry (0.00)",
        "much less dark (-0.50)",
        "slightly more tiny (0.05)",
        "much more flat (0.50)",  # the level follows the displayed (rounded) weight
    ]
    assert [level_phrase(w) for w in (0.7, 0.3, 0.1, 0.01, -0.7, -0.3, -0.1)] == [
        "much more", "more", "slightly more", "", "much less", "less", "slightly less"]


def test_explain_on_a_real_decomposition():
    dec = decompose(0.6 * basis(0) + 0.1 * basis(1), {"striped": basis(0), "warm": basis(1)})
    assert explain(dec) == ["much more striped (0.60)", "slightly more warm (0.10)"]

"""persviz.seeding.step_rng: the same (seed, step) gives the same numpy and torch streams, any other pair others."""
import itertools

import numpy as np
import torch

from persviz.seeding import step_rng


def _draws(seed, step):
    rng, g = step_rng(seed, step)
    return rng.normal(size=8), torch.randn(8, generator=g)


def test_same_seed_and_step_give_the_same_streams():
    (a_np, a_t), (b_np, b_t) = _draws(3, 17), _draws(3, 17)
    np.testing.assert_array_equal(a_np, b_np)
    assert torch.equal(a_t, b_t)


def test_each_call_starts_the_streams_afresh():
    rng, g = step_rng(3, 17)
    rng.normal(size=100), torch.randn(100, generator=g)  # drawing from one pair does not move the next
    (a_np, a_t), (b_np, b_t) = _draws(3, 17), _draws(3, 17)
    np.testing.assert_array_equal(a_np, b_np)
    assert torch.equal(a_t, b_t)


def test_types_and_cpu_generator():
    rng, g = step_rng(0, 0)
    assert isinstance(rng, np.random.Generator) and isinstance(g, torch.Generator)
    assert g.device.type == "cpu"


def test_different_steps_or_seeds_give_different_streams():
    a_np, a_t = _draws(3, 17)
    for other in [(3, 18), (4, 17), (17, 3)]:
        b_np, b_t = _draws(*other)
        assert not np.array_equal(a_np, b_np), other
        assert not torch.equal(a_t, b_t), other


def test_no_two_pairs_of_a_small_grid_share_a_stream():
    pairs = list(itertools.product(range(4), range(60)))
    np_first = {float(step_rng(s, t)[0].random()) for s, t in pairs}
    torch_first = {float(torch.rand(1, generator=step_rng(s, t)[1])) for s, t in pairs}
    assert len(np_first) == len(pairs) and len(torch_first) == len(pairs)

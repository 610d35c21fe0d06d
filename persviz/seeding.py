"""One seeding helper: the random streams of one training step, the same on every machine and after a resume."""
from __future__ import annotations

import numpy as np
import torch


def step_rng(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch (CPU) random streams of one training step of a run seeded with `seed`."""
    return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)


__all__ = ["step_rng"]

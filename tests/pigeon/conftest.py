"""Fixtures of Pigeon's tests."""
import pytest


@pytest.fixture(scope="module")
def tiny_pigeon_pipeline():
    """One tiny random Pigeon pipeline (persviz.pigeon.model.tiny_pipeline, 4 personalized tokens) per module."""
    from persviz.pigeon.model import tiny_pipeline
    return tiny_pipeline(seed=0, d_model=32, n_out_tokens=4)

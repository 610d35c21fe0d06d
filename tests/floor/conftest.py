"""Fixtures of the floor's tests (trainers)."""
import pytest

from persviz.shapesworld import Obj, Scene, render_batch


@pytest.fixture(scope="module")
def red_square_images():
    """Four 32x32 renders of one concept (a red striped square) on different backgrounds."""
    obj = Obj("square", "red", "striped", "large")
    return render_batch([Scene(obj, bg) for bg in ("gray", "white", "navy", "beige")], seed=0)

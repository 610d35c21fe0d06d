"""persviz.attention_plots: the overlay and the per-word grid return their Figure, draw on a given ax, show the
upsampled map / the blended cells, and leave matplotlib's global state alone."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from persviz.attention_plots import attention_overlay, overlay_rgb, upsampled, word_grid  # noqa: E402

from tests.helpers import new_ax  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_global_matplotlib_state")


def _image(h=8, w=8, value=100):
    return np.full((h, w, 3), value, np.uint8)


def test_upsampled_is_bilinear_and_keeps_a_constant_map():
    np.testing.assert_allclose(upsampled(torch.full((2, 2), 0.25), (8, 8)), np.full((8, 8), 0.25), atol=1e-7)
    m = upsampled(np.array([[0.0, 1.0]]), (1, 4))
    np.testing.assert_allclose(m, [[0.0, 0.25, 0.75, 1.0]], atol=1e-7)  # align_corners=False
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        upsampled(np.zeros((1, 2, 2)), (4, 4))


def test_attention_overlay_draws_the_image_and_the_upsampled_map_on_the_given_ax():
    fig, ax = new_ax()
    att = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    out = attention_overlay(_image(), att, ax=ax, title="<cat>")
    assert out is fig and ax.get_title() == "<cat>"
    assert len(ax.images) == 2
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), _image())
    np.testing.assert_allclose(np.asarray(ax.images[1].get_array()), upsampled(att, (8, 8)))
    assert ax.images[1].get_clim() == (0, pytest.approx(upsampled(att, (8, 8)).max()))
    alone = attention_overlay(_image(), att, colorbar=False)
    assert isinstance(alone, Figure) and len(alone.axes) == 1


def test_word_grid_tiles_image_then_one_overlay_per_word_with_a_shared_scale():
    images = np.stack([_image(value=50), _image(value=200)])
    maps = {"<cat>": torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)), "grass": torch.zeros(2, 4, 4)}
    fig, ax = new_ax()
    assert word_grid(images, maps, ["<cat>", "grass"], ax=ax) is fig
    canvas = np.asarray(ax.images[0].get_array())
    assert canvas.shape == (2 * 9 - 1, 3 * 9 - 1, 3)  # 2 rows, 3 columns of 8x8 with a 1-pixel gap
    np.testing.assert_array_equal(canvas[:8, :8], images[0])
    top = float(maps["<cat>"][1].max())
    np.testing.assert_array_equal(canvas[9:, 9:17], overlay_rgb(images[1], maps["<cat>"][1], alpha=0.6, vmax=top))
    np.testing.assert_array_equal(canvas[9:, 18:], overlay_rgb(images[1], maps["grass"][1], alpha=0.6, vmax=top))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image", "<cat>", "grass"]
    with pytest.raises(KeyError, match="no maps for"):
        word_grid(images, maps, ["sky"])
    with pytest.raises(ValueError, match="1 maps of"):
        word_grid(images, {"a": torch.zeros(1, 4, 4)})

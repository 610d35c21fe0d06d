"""persviz.widgets (the widget base): PNG bytes read back by PIL, tiles laid out by hand, HTML tables parsed back with
html.parser, and the Explorer skeleton's error handling."""
import html
import io
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from persviz.widgets import Explorer, error_html, html_table, one_image, png_bytes, status_html, tile_images


def _read_png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def test_png_bytes_round_trip_through_pil():
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_read_png(png_bytes(arr)), arr)
    np.testing.assert_array_equal(_read_png(png_bytes(arr[None])), arr)  # [1, H, W, 3]
    np.testing.assert_array_equal(_read_png(png_bytes(Image.fromarray(arr))), arr)
    np.testing.assert_array_equal(_read_png(png_bytes(torch.from_numpy(arr))), arr)


def test_png_bytes_of_float_and_grey_images():
    f = np.array([[[0.0, 0.5, 1.0]]])  # one pixel
    assert _read_png(png_bytes(f)).tolist() == [[[0, 128, 255]]]
    grey = np.array([[0, 200], [50, 255]], dtype=np.uint8)
    back = _read_png(png_bytes(grey))
    assert back.shape == (2, 2, 3) and all(np.array_equal(back[..., c], grey) for c in range(3))


def test_one_image_refuses_a_batch():
    with pytest.raises(ValueError, match="expected one image; got 2"):
        one_image(np.zeros((2, 4, 4, 3), np.uint8))


def test_tile_images_places_each_image_between_white_gaps():
    imgs = np.stack([np.full((4, 5, 3), v, np.uint8) for v in (10, 20, 30)])
    out = tile_images(imgs, pad=2)
    assert out.shape == (4, 3 * 5 + 2 * 2, 3) and out.dtype == np.uint8
    for i, v in enumerate((10, 20, 30)):
        assert (out[:, i * 7:i * 7 + 5] == v).all()
    assert (out[:, 5:7] == 255).all() and (out[:, 12:14] == 255).all()
    assert tile_images(imgs[0]).shape == (4, 5, 3)  # one image, no gap
    assert tile_images(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)  # grey


class _Table(HTMLParser):
    """The rows of an HTML table as lists of cell texts (entities decoded), and the tags seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_data(self, data):
        self.rows[-1][-1] += data


def _parse(text):
    p = _Table()
    p.feed(text)
    return p


def test_html_table_escapes_names_and_values_and_formats_numbers():
    t = _parse(html_table({"<b>x</b>": 0.123456, "n": 3, "s": "a&b <i>", "flag": True, "f32": np.float32(2.5),
                           "third": torch.tensor(1 / 3), "big": 123456.0, "i64": np.int64(7)}))
    assert t.rows == [["<b>x</b>", "0.1235"], ["n", "3"], ["s", "a&b <i>"], ["flag", "True"], ["f32", "2.5"],
                      ["third", "0.3333"], ["big", "1.235e+05"], ["i64", "7"]]
    assert set(t.tags) == {"table", "tr", "th", "td"}  # the names and values stayed text, never markup


def test_html_table_with_columns_leaves_missing_cells_empty():
    t = _parse(html_table({"row1": {"a": 1.0, "b": 2.0}, "row2": {"b": 0.5, "c<": "z"}}))
    assert t.rows == [["", "a", "b", "c<"], ["row1", "1", "2", ""], ["row2", "", "0.5", "z"]]


def test_error_and_status_lines_escape_their_text():
    assert html.escape("<x> & y") in error_html("<x> & y") and "<x>" not in error_html("<x> & y")
    assert html.escape("<x>") in status_html("<x>") and "<x>" not in status_html("<x>")


class _Tiny(Explorer):
    kept_note = " (earlier result kept)"

    def __init__(self):
        super().__init__()
        self.message = SimpleNamespace(value="")
        self.button = SimpleNamespace(disabled=False)


def test_explorer_attempt_shows_errors_instead_of_raising():
    ex = _Tiny()
    assert ex.last is None and ex.error is None

    def boom():
        raise ValueError("bad <input>")

    assert ex.attempt(boom, context="generate") == (False, None)
    assert ex.error == "generate: ValueError: bad <input>"
    assert html.escape(ex.error) in ex.message.value
    seen = []

    def ok():
        seen.append(ex.button.disabled)
        return 42

    assert ex.attempt(ok, busy="working") == (True, 42)
    assert seen == [True] and ex.button.disabled is False  # disabled only while computing
    assert ex.succeed("done") is True and ex.error is None and "done" in ex.message.value
    assert ex.succeed() is True and ex.message.value == ""
    ex.last = 42
    assert ex.fail("oops") is False and ex.error == "oops" and "oops (earlier result kept)" in ex.message.value
    assert ex.attempt(boom, busy="working")[0] is False and ex.button.disabled is False


def test_explorer_mark_stale_is_a_notice_until_the_next_success():
    ex = _Tiny()
    ex.mark_stale("the images below are for seed <1>")
    assert ex.stale and ex.error is None
    assert html.escape("seed <1>") in ex.message.value and "#b00020" not in ex.message.value  # not an error's red
    assert ex.succeed("done") and not ex.stale and "&#9888;" not in ex.message.value

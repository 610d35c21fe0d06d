"""persviz.tea.widgets (and the widget base's png_bytes): the explorers driven headless, make_tea_generate_fn on a
fake pipeline."""
import io
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import ipywidgets as W  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from persviz.tea.adjust import slerp_adjust  # noqa: E402
from persviz.tea.widgets import SnapshotExplorer, TEAExplorer, make_tea_generate_fn  # noqa: E402
from persviz.widgets import png_bytes  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_global_matplotlib_state")

def _png_array(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


RED, BLUE = (255, 0, 0), (0, 0, 255)


class FakeGenerate:
    """Solid colours: red before TEA, an 'after' whose green channel encodes the rotation."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, seed, rotation, scale):
        self.calls.append((prompt, seed, rotation, scale))
        before = np.full((6, 8, 3), RED, np.uint8)
        after = np.full((6, 8, 3), (0, round(255 * rotation), 255), np.uint8)
        return before, after


def test_tea_explorer_click_calls_generate_with_the_widget_values():
    gen = FakeGenerate()
    scores = lambda prompt, b, a: {"CLIP-T": {"before": 25.0, "after": 27.5}, "<b>x</b>": 1}  # noqa: E731
    ex = TEAExplorer(gen, scores, prompt="a <cat> on a beach")
    assert isinstance(ex.widget, W.VBox) and ex.last is None
    ex.rotation.value, ex.scale.value, ex.seed.value = 0.4, 0.75, 7
    ex.prompt.value = "a <cat> in the snow"
    assert ex.state == {"prompt": "a <cat> in the snow", "seed": 7, "rotation": 0.4, "scale": 0.75}
    ex.button.click()
    assert gen.calls == [("a <cat> in the snow", 7, 0.4, 0.75)]
    before, after = _png_array(ex.before_image.value), _png_array(ex.after_image.value)
    assert before.shape == (6, 8, 3) and (before == RED).all()
    assert (after == (0, 102, 255)).all()
    assert ex.before_image.format == "png"
    assert "<table" in ex.scores.value and "27.5" in ex.scores.value and "&lt;b&gt;" in ex.scores.value
    assert ex.error is None and ex.last["seed"] == 7 and ex.last["scores"]["<b>x</b>"] == 1
    assert not ex.button.disabled


def test_tea_explorer_shows_errors_instead_of_raising():
    gen = FakeGenerate()
    ex = TEAExplorer(gen, prompt="   ")
    ex.button.click()
    assert gen.calls == [] and "prompt is empty" in ex.message.value and ex.before_image.value == b""
    ex.prompt.value, ex.seed.value = "a <cat>", -1
    assert ex.update() is False and "seed must be >= 0" in ex.error

    def broken(*args):
        raise RuntimeError("placeholder '<cat>' is not in the tokenizer")

    ex = TEAExplorer(broken, prompt="a <cat>")
    ex.button.click()
    assert "RuntimeError: placeholder" in ex.message.value and "&#x27;&lt;cat&gt;&#x27;" in ex.message.value
    assert not ex.button.disabled
    ex = TEAExplorer(lambda *a: np.zeros((2, 4, 4, 3)), prompt="a <cat>")
    ex.button.click()
    assert "(before_image, after_image)" in ex.error
    with pytest.raises(ValueError, match="rotation must be a number in"):
        TEAExplorer(gen, rotation=1.5)


def test_tea_explorer_auto_regenerates_when_a_slider_moves():
    gen = FakeGenerate()
    ex = TEAExplorer(gen, prompt="a <cat>", auto=True)
    ex.scale.value = 0.25
    assert gen.calls == [("a <cat>", 0, 0.2, 0.25)]
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_snapshot_explorer_follows_its_slider():
    seen = []

    def render(step):
        seen.append(step)
        if step == 400:
            raise KeyError("no snapshot")
        out = {"norm": step / 100, "shift": {"L2": 1.25, "KL": 0.5}}
        if step != 200:
            out["images"] = np.stack([np.full((4, 5, 3), BLUE, np.uint8)] * 2)
        return out

    ex = SnapshotExplorer([100, 200, 400], render)
    assert seen == [100] and ex.last["norm"] == 1.0 and ">1.25<" in ex.info.value
    assert _png_array(ex.image.value).shape == (4, 2 * 5 + 2, 3)  # two images side by side
    ex.slider.value = 200
    assert seen == [100, 200] and ex.state == {"step": 200} and ex.last["norm"] == 2.0
    assert ex.image.layout.display == "none"
    ex.slider.value = 400
    assert "KeyError" in ex.message.value and ex.last["step"] == 200
    with pytest.raises(ValueError, match="not one of the saved steps"):
        SnapshotExplorer([100, 200], render, step=300)
    with pytest.raises(ValueError, match="distinct"):
        SnapshotExplorer([100, 100], render)


def test_png_bytes_round_trips():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_png_array(png_bytes(img)), img)
    np.testing.assert_array_equal(_png_array(png_bytes(Image.fromarray(img))), img)
    assert _png_array(png_bytes(np.ones((1, 3, 3, 3)))).tolist() == [[[255] * 3] * 3] * 3
    with pytest.raises(ValueError, match="expected one image"):
        png_bytes(np.zeros((2, 3, 3, 3), np.uint8))


# ----------------------------------------------------------------------------- make_tea_generate_fn on a fake pipeline


class _Tok:
    """A whitespace tokenizer with the interface tea() reads (unknown words split into two ids)."""

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}
        self.added_tokens_encoder = {"<cat>": self.vocab["<cat>"]}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [i for w in text.split() for i in ([self.vocab[w]] if w in self.vocab else [0, 1])]}

    def tokenize(self, text):
        return text.split()

    def get_vocab(self):
        return dict(self.vocab)


class _FakePipe:
    """Images = seeded noise + a colour read from the placeholder's embedding row, so TEA changes them."""

    def __init__(self):
        self.tokenizer = _Tok(["a", "photo", "of", "square", "on", "gray", "<cat>"])
        torch.manual_seed(0)
        self.text_encoder = SimpleNamespace(emb=torch.nn.Embedding(7, 8))
        self.text_encoder.get_input_embeddings = lambda: self.text_encoder.emb
        self.calls = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        self.calls.append((list(prompts), num_inference_steps, guidance_scale))
        row = self.text_encoder.emb.weight[self.tokenizer.vocab["<cat>"], :3].detach()
        ims = [0.5 * torch.rand(4, 4, 3, generator=g) + 0.5 * torch.sigmoid(row) for g in generator]
        return SimpleNamespace(images=torch.stack(ims).numpy())


def test_make_tea_generate_fn_same_seed_with_and_without_tea():
    pipe = _FakePipe()
    W0 = pipe.text_encoder.emb.weight.detach().clone()
    fn = make_tea_generate_fn(pipe, "<cat>", "square", steps=2, guidance=3.0)
    before, after = fn("a photo of <cat>", 3, 0.5, 0.5)
    assert before.dtype == np.uint8 and before.shape == (4, 4, 3)
    assert pipe.calls == [(["a photo of <cat>"], 2, 3.0)] * 2
    torch.testing.assert_close(pipe.text_encoder.emb.weight, W0, rtol=0, atol=0)  # restored
    g = torch.Generator().manual_seed(3)
    noise = 0.5 * torch.rand(4, 4, 3, generator=g)
    for img, row in ((before, W0[6]), (after, slerp_adjust(W0[6], W0[3], 0.5, 0.5))):
        want = np.clip(np.round((noise + 0.5 * torch.sigmoid(row[:3])).numpy() * 255), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(img, want)  # same seed; only the placeholder row differs
    b0, a0 = fn("a photo of <cat>", 3, 0.0, 0.0)
    np.testing.assert_array_equal(b0, a0)  # rotation = scale = 0 leaves V*
    with pytest.raises(ValueError, match="must contain the learned token"):
        fn("a photo of square", 0, 0.2, 0.5)
    with pytest.raises(ValueError, match="unknown class word"):
        make_tea_generate_fn(pipe, "<cat>", "zebra")
    ex = TEAExplorer(fn, prompt="a photo of square")
    ex.button.click()
    assert "must contain the learned token" in ex.message.value


# ----------------------------------------------------------------------------- stale images, the sweep's default


def test_tea_explorer_marks_its_images_stale_when_an_input_changes():
    gen = FakeGenerate()
    ex = TEAExplorer(gen, prompt="a <cat>")
    ex.seed.value = 2  # nothing on screen yet: nothing to mark
    assert not ex.stale and "press generate" in ex.message.value
    ex.button.click()
    shown = ex.after_image.value
    for widget, value in ((ex.rotation, 0.6), (ex.scale, 0.1), (ex.prompt, "a <cat> on a beach"), (ex.seed, 5)):
        old = widget.value
        widget.value = value
        assert ex.stale and "the images below are for seed 2, rotation 0.20, scale 0.50: a &lt;cat&gt;" in ex.message.value
        assert "press generate" in ex.message.value and "#b00020" not in ex.message.value  # a notice, not an error
        assert ex.after_image.value == shown and len(gen.calls) == 1  # kept on screen, nothing generated
        widget.value = old  # back to the inputs of the images: current again
        assert not ex.stale and "seed 2, rotation 0.20" in ex.message.value
    ex.rotation.value = 0.6
    ex.button.click()
    assert not ex.stale and gen.calls[-1] == ("a <cat>", 2, 0.6, 0.5) and ex.after_image.value != shown
    auto = TEAExplorer(gen, prompt="a <cat>", auto=True)
    auto.button.click()
    auto.scale.value = 0.25  # auto: a slider regenerates, never stale
    assert not auto.stale and gen.calls[-1] == ("a <cat>", 0, 0.2, 0.25)
    auto.prompt.value = "a <cat> in the snow"  # the prompt is not auto: stale
    assert auto.stale


def _sweep_argmax(path):
    """The images of the shipped sweep with the largest oracle-context gain over rotation 0, scale 0 (same prompt and
    seed), read from the JSON by hand: {(prompt, seed, rotation, scale): oracle_concept after} for every tie."""
    import json
    import re
    items = json.loads(path.read_text())["items"]
    base = items["rotation 0, scale 0"]
    ctx0 = {(p, s): x for p, s, x in zip(base["prompt"], base["seed"], base["oracle_context"])}
    gains = {}
    for cell, it in items.items():
        m = re.fullmatch(r"rotation ([\d.]+), scale ([\d.]+)", cell)
        if m is None or cell == "rotation 0, scale 0":
            continue
        for p, s, x, k in zip(it["prompt"], it["seed"], it["oracle_context"], it["oracle_concept"]):
            gains[(p, s, float(m.group(1)), float(m.group(2)))] = (x - ctx0[(p, s)], k)
    top = max(g for g, _ in gains.values())
    return top, {key: k for key, (g, k) in gains.items() if g == top}, len(gains)


def test_tea_explorer_from_the_shipped_sweep_opens_where_the_oracle_sees_the_largest_context_gain():
    from persviz.paths import DATA_DIR

    path = DATA_DIR / "shapesworld" / "concepts" / "candy" / "sweep" / "sweep.json"
    top, ties, n = _sweep_argmax(path)
    gen = FakeGenerate()
    ex = TEAExplorer.from_sweep(gen, path, "<candy>")
    s = ex.state
    assert "<candy>" in s["prompt"] and "{}" not in s["prompt"]
    key = (s["prompt"].replace("<candy>", "{}"), s["seed"], s["rotation"], s["scale"])
    assert top > 0 and key in ties  # an image with the largest gain of the whole sweep
    best_kept = max(ties.values())
    assert ties[key] == best_kept  # among those, the concept still read right after TEA
    assert (s["rotation"], s["scale"]) == min((r, sc) for (_, _, r, sc), k in ties.items() if k == best_kept)
    msg = ex.message.value
    assert "saved sweep" in msg and f"{n} images searched" in msg and f"seed {s['seed']}" in msg
    assert f"rotation {s['rotation']:g}, scale {s['scale']:g}" in msg and "context wrong before TEA and right after" in msg
    ex.button.click()
    assert gen.calls == [(s["prompt"], s["seed"], s["rotation"], s["scale"])]
    assert "saved sweep" in ex.message.value  # the note stays while the inputs are the sweep's
    ex.seed.value = s["seed"] + 1
    ex.button.click()
    assert "saved sweep" not in ex.message.value

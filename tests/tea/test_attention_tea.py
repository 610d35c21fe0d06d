"""persviz.attention together with TEA on the tiny pipeline: inside tea(...) (token level) and with prompt-level
embeddings the collector leaves the image unchanged, and TEA changes where the placeholder's attention goes."""
import numpy as np
import pytest
import torch

from persviz.attention import attention_maps
from persviz.tea.pipeline import encode_prompt_level, tea

from tests.helpers import random_vector

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a <cat> on a gray background"


def _gen(pipe, prompt=PROMPT, **kw):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                **kw).images


def test_token_level_tea_with_the_collector(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pipe.load_textual_inversion({"<cat>": 4 * random_vector(1)})
    with attention_maps(pipe, words=["<cat>", "background"]) as before:
        _gen(pipe)
    with tea(pipe, "<cat>", "square", 0.5, 0.5):
        plain = _gen(pipe)
        with attention_maps(pipe, words=["<cat>", "background"]) as after:
            inside = _gen(pipe)
    assert np.abs(plain - inside).max() == 0
    assert not torch.allclose(before.shares["<cat>"], after.shares["<cat>"])


def test_prompt_level_tea_with_the_collector(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    personal, cls = "a sks square on a gray background", "a square on a gray background"
    emb, neg = encode_prompt_level(pipe, personal, cls, 0.3, 0.5)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg)
    plain = _gen(pipe, prompt=None, **kw)
    with attention_maps(pipe, words=["sks", "square"], prompt=personal) as m:
        inside = _gen(pipe, prompt=None, **kw)
    assert np.abs(plain - inside).max() == 0
    assert m.maps["sks"].shape == (1, 8, 8) and float(m.shares["sks"][0]) > 0

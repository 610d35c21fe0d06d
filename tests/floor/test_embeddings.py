"""persviz.embeddings on a real (tiny, random) StableDiffusionPipeline: embedding files (diffusers, .bin, A1111) and
the statistics of the token-embedding matrix."""
import contextlib
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from persviz.embeddings import (
    class_word_id,
    embedding_matrix,
    load_learned_embeds,
    load_learned_token,
    norm_ratio_and_cosine,
    save_learned_embeds,
    token_row,
    vocab_norms,
)

from tests.helpers import D, random_vector as _vec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _W(pipe):
    return pipe.text_encoder.get_input_embeddings().weight


# ----------------------------------------------------------------------------- embedding files


def test_save_then_load_textual_inversion_round_trip(tmp_path, tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    v = _vec(3)
    out = save_learned_embeds({"<cat>": v}, tmp_path / "cat")
    assert out == tmp_path / "cat" / "learned_embeds.safetensors" and os.listdir(out.parent) == [out.name]
    assert torch.equal(load_learned_embeds(tmp_path / "cat")["<cat>"], v[None])
    pipe.load_textual_inversion(str(tmp_path / "cat"))
    assert torch.equal(_W(pipe).detach()[token_row(pipe, "<cat>")], v)
    # .bin and multi-vector, read back by diffusers
    m = _vec(4, n=2)
    out = save_learned_embeds({"<dog>": m[0], "<dog>_1": m[1]}, tmp_path / "dog.bin")
    pipe.load_textual_inversion(str(out))
    assert torch.equal(_W(pipe).detach()[[token_row(pipe, "<dog>"), token_row(pipe, "<dog>_1")]], m)
    assert torch.equal(load_learned_embeds(out)["<dog>"], m)


class _Records(logging.Handler):
    """The messages transformers' and diffusers' loggers emit while attached."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _library_messages():
    """Every message of the transformers and diffusers loggers inside the block (warning_once's memory cleared, so a
    notice already printed earlier in the process is printed again); their levels and warnings' filters are kept."""
    from transformers.utils import logging as tf_logging
    tf_logging.warning_once.cache_clear()
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler.messages
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


NOTICE = "mean_resizing"


@pytest.mark.parametrize("multi", [False, True])
def test_load_learned_token_equals_diffusers_load_without_the_resize_notice(tmp_path, tiny_sd_pipeline, multi):
    import copy
    import warnings
    from transformers.utils import logging as tf_logging

    path = save_learned_embeds({"<cat>": _vec(6, n=3 if multi else 1)}, tmp_path / "cat")
    ours, theirs = tiny_sd_pipeline, copy.deepcopy(tiny_sd_pipeline)
    with _library_messages() as said:
        theirs.load_textual_inversion(str(path))
    assert any(NOTICE in m for m in said)  # the reference: diffusers' own load prints the notice
    level, filters = tf_logging.get_verbosity(), list(warnings.filters)
    with _library_messages() as said:
        load_learned_token(ours, str(path))
        tf_logging.get_logger("transformers.modeling_utils").warning("a real problem")
    assert not any(NOTICE in m for m in said) and "a real problem" in said  # real warnings still come through
    assert tf_logging.get_verbosity() == level and warnings.filters == filters  # nothing silenced globally
    assert torch.equal(_W(ours).detach(), _W(theirs).detach())  # the same rows, the same size
    assert ours.tokenizer.get_added_vocab() == theirs.tokenizer.get_added_vocab()
    assert ours.text_encoder.config.vocab_size == theirs.text_encoder.config.vocab_size == len(ours.tokenizer)
    # a dict, as persviz's callers pass it; a refused load leaves the matrix as it was
    row = _vec(7)
    load_learned_token(ours, {"<dog>": row}, token="<dog>")
    theirs.load_textual_inversion({"<dog>": row}, token="<dog>")
    assert torch.equal(_W(ours).detach(), _W(theirs).detach())
    size = _W(ours).shape
    with pytest.raises(ValueError, match="already in tokenizer"):
        load_learned_token(ours, {"<dog>": row}, token="<dog>")
    assert _W(ours).shape == size and ours.text_encoder.config.vocab_size == size[0]


def test_a1111_files_load_and_convert(tmp_path, tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    t = _vec(5, n=2)
    pt = tmp_path / "mystyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "mystyle", "step": 500,
                "sd_checkpoint": "abc123", "sd_checkpoint_name": "model"}, pt)
    emb = load_learned_embeds(pt)
    assert list(emb) == ["mystyle"] and torch.equal(emb["mystyle"], t)
    assert list(load_learned_embeds(pt, token="<s>")) == ["<s>"]
    pipe.load_textual_inversion(str(pt))  # diffusers reads the same file identically
    assert torch.equal(_W(pipe).detach()[[token_row(pipe, "mystyle"), token_row(pipe, "mystyle_1")]], t)
    converted = save_learned_embeds(load_learned_embeds(pt, token="<conv>"), tmp_path / "conv")
    pipe.load_textual_inversion(str(converted))
    assert torch.equal(_W(pipe).detach()[token_row(pipe, "<conv>_1")], t[1])
    st = tmp_path / "negstyle.safetensors"
    save_file({"emb_params": t}, str(st))
    emb = load_learned_embeds(st)
    assert list(emb) == ["negstyle"] and torch.equal(emb["negstyle"], t)


def test_embedding_file_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"unknown learned-embedding layout; keys found: \['foo', 'step'\]"):
        load_learned_embeds({"foo": "bar", "step": 3})
    with pytest.raises(ValueError, match="SDXL embedding"):
        load_learned_embeds({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)})
    with pytest.raises(ValueError, match="no token name; pass token="):
        load_learned_embeds({"emb_params": torch.ones(1, D)})
    with pytest.raises(FileNotFoundError, match="no learned-embedding file"):
        load_learned_embeds(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="one token per file and got 2"):
        save_learned_embeds({"<a>": torch.ones(D), "<b>": torch.ones(D)}, tmp_path / "x")
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


# ----------------------------------------------------------------------------- statistics


def test_rows_matrix_norms_and_ratio(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    W = embedding_matrix(ti_pipe)
    assert W.shape == (len(ti_pipe.tokenizer), D) and W.data_ptr() == _W(ti_pipe).data_ptr()
    assert token_row(ti_pipe, "<cat>") == ti_pipe.tokenizer.convert_tokens_to_ids("<cat>")
    assert token_row((ti_pipe.tokenizer, ti_pipe.text_encoder), "square") == 657
    assert class_word_id(ti_pipe.tokenizer, "sks") == 655
    torch.testing.assert_close(vocab_norms(ti_pipe), W.norm(dim=-1))
    r, cos = norm_ratio_and_cosine(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.5]))
    assert float(r) == pytest.approx(2.0) and float(cos) == pytest.approx(0.8)
    r, cos = norm_ratio_and_cosine(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([0.0, 5.0]))
    assert r.tolist() == pytest.approx([1.0, 0.2]) and cos.tolist() == pytest.approx([0.8, 1.0])
    with pytest.raises(ValueError, match="unknown class word 'gray background' \\(it tokenizes to 2 tokens"):
        class_word_id(ti_pipe.tokenizer, "gray background")
    with pytest.raises(ValueError, match="load its embedding first"):
        token_row(ti_pipe, "<dog>")

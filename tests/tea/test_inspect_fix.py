"""persviz.tea.inspect_file and persviz.tea.fix_file on the tiny random pipeline (D=32) and the shipped ShapesWorld one.

The central check: a file repaired by fix_embedding, loaded with diffusers' own ``pipe.load_textual_inversion``, gives
the same image as ``with tea(pipe, placeholder, class_word):`` on the original file (float32). The fixtures are
written as the tools write them (see tests/floor/test_embedding_files.py for the sources)."""
import copy

import numpy as np
import pytest
import safetensors.torch
import torch

from persviz.embedding_files import EmbeddingFileError, read_embedding_file
from persviz.embeddings import class_word_id, norm_ratio_and_cosine
from persviz.paths import SHAPESWORLD_DIR
from persviz.tea.adjust import DEFAULTS, slerp_adjust
from persviz.tea.fix_file import fix_embedding
from persviz.tea.inspect_file import inspect_embedding, load_text_model
from persviz.tea.pipeline import tea

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D = 32
CHECKERS = SHAPESWORLD_DIR / "concepts/checkers/textual_inversion/learned_embeds.safetensors"


def _rows(n=1, seed=0, scale=3.0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * scale


def _write(tmp_path, kind, v):
    """(path, token to load it under) of a fixture file of `kind` holding rows v [n, D]."""
    if kind == "diffusers":  # diffusers textual_inversion.py save_progress
        path = tmp_path / "learned_embeds-steps-100.safetensors"
        safetensors.torch.save_file({"<cat>": v}, str(path), metadata={"format": "pt"})
        return path, "<cat>"
    if kind == "custom-diffusion":  # train_custom_diffusion.py save_new_embed: safetensors bytes in a .bin
        path = tmp_path / "<cat>.bin"
        safetensors.torch.save_file({"<cat>": v[0]}, str(path), metadata={"format": "pt"})
        return path, "<cat>"
    if kind == "a1111":  # A1111 Embedding.save
        path = tmp_path / "cat.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "<cat>", "step": 7,
                    "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
        return path, "<cat>"
    path = tmp_path / "cat.safetensors"  # kohya / A1111 emb_params
    safetensors.torch.save_file({"emb_params": v}, str(path))
    return path, None


def _gen(pipe, prompt):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=16, width=16, generator=g,
                output_type="np").images


# ----------------------------------------------------------------------------- inspect


def test_inspect_reports_norms_ratio_cosine_and_nearest_words(tiny_sd_pipeline_shared, tmp_path):
    pipe = tiny_sd_pipeline_shared
    W = pipe.text_encoder.get_input_embeddings().weight.detach()
    circle = W[class_word_id(pipe.tokenizer, "circle")]
    v = torch.stack([circle * 5.0, _rows(seed=1)[0] * 1e-3])
    path, _ = _write(tmp_path, "diffusers", v)
    r = inspect_embedding(path, pipe, class_word="square", k=3)
    c = W[class_word_id(pipe.tokenizer, "square")]
    ratio, cos = norm_ratio_and_cosine(v, c)
    assert [x.name for x in r.rows] == ["<cat>", "<cat>_1"] and r.width == D
    assert r.rows[0].ratio == pytest.approx(float(ratio[0])) and r.rows[1].cosine == pytest.approx(float(cos[1]))
    assert r.rows[0].nearest[0][0] == "circle" and r.rows[0].nearest[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in r.rows[0].nearest] == sorted((s for _, s in r.rows[0].nearest), reverse=True)
    norms = W[: pipe.tokenizer.vocab_size].norm(dim=-1)
    assert r.vocab_norms["max"] == pytest.approx(float(norms.max()))
    assert r.vocab_norms["p50"] == pytest.approx(float(norms.double().median()), rel=0.05)
    assert r.rows[0].percentile == 100.0 and r.rows[1].percentile == 0.0 and r.collapsed
    text = r.to_text()
    for part in ("diffusers (safetensors)", "step 100", "|V*|/|c|", "cos(V*,c)", "circle 1.00", ">max", "persviz fix"):
        assert part in text, part
    assert r.to_dict()["rows"][0]["nearest"][0][0] == "circle"
    plain = inspect_embedding(path, pipe)  # without a class word: no ratio, no cosine
    assert plain.rows[0].ratio is None and "|V*|/|c|" not in plain.to_text()


def test_inspect_refuses_what_does_not_fit(tiny_sd_pipeline_shared, tmp_path):
    pipe = tiny_sd_pipeline_shared
    path, _ = _write(tmp_path, "diffusers", _rows())
    with pytest.raises(ValueError, match="tokenizes to"):
        inspect_embedding(path, pipe, class_word="squarecircle")
    safetensors.torch.save_file({"<w>": torch.ones(1, 16)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(EmbeddingFileError, match="width 16 .* 32 wide.*trained on another model"):
        inspect_embedding(tmp_path / "w.safetensors", pipe)
    safetensors.torch.save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)},
                                str(tmp_path / "xl.safetensors"))
    with pytest.raises(EmbeddingFileError, match="SDXL"):
        inspect_embedding(tmp_path / "xl.safetensors", pipe)


# ----------------------------------------------------------------------------- fix: the same image as tea


@pytest.mark.parametrize("kind,n", [("diffusers", 1), ("diffusers", 2), ("custom-diffusion", 1), ("a1111", 2),
                                    ("kohya", 1)])
def test_fixed_file_gives_the_image_of_tea_on_the_original(tiny_sd_pipeline_shared, tmp_path, kind, n):
    src, token = _write(tmp_path, kind, _rows(n))
    out = tmp_path / ("fixed" + src.suffix)
    result = fix_embedding(src, tiny_sd_pipeline_shared, "square", out, token=token)
    assert result.out == out and read_embedding_file(out).format == read_embedding_file(src).format
    prompt = "a <cat> on a gray background"
    with_tea, fixed = copy.deepcopy(tiny_sd_pipeline_shared), copy.deepcopy(tiny_sd_pipeline_shared)
    with_tea.load_textual_inversion(str(src), token="<cat>")
    fixed.load_textual_inversion(str(out), token="<cat>")
    with tea(with_tea, "<cat>", "square") as adj:
        a = _gen(with_tea, prompt)
        W_tea = with_tea.text_encoder.get_input_embeddings().weight.detach().clone()
    b = _gen(fixed, prompt)
    assert torch.equal(W_tea, fixed.text_encoder.get_input_embeddings().weight.detach())
    assert torch.equal(adj.adjusted, result.after)
    assert float(np.abs(a - b).max()) <= 1e-6
    assert (result.rotation, result.scale) == tuple(DEFAULTS["textual_inversion"].values())


def test_fixed_checkers_token_on_the_shipped_pipeline(shapesworld_pipeline, tmp_path):
    """The shipped <checkers> token (class word 'square') at 32 px: fixed file == tea, float32."""
    out = tmp_path / "checkers_fixed.safetensors"
    result = fix_embedding(CHECKERS, shapesworld_pipeline, "square", out)
    assert result.ratio_after[0] < result.ratio_before[0] and result.cosine_after[0] > result.cosine_before[0]
    with_tea, fixed = copy.deepcopy(shapesworld_pipeline), copy.deepcopy(shapesworld_pipeline)
    with_tea.load_textual_inversion(str(CHECKERS))
    fixed.load_textual_inversion(str(out))
    g = lambda p: p("a <checkers> on a gray background", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # noqa: E731
    with tea(with_tea, "<checkers>", "square"):
        a = g(with_tea)
    b = g(fixed)
    assert a.dtype == np.float32 and float(np.abs(a - b).max()) <= 1e-6


def test_fix_keeps_dtype_and_knobs(tiny_sd_pipeline_shared, tmp_path):
    v = _rows(2).half()
    safetensors.torch.save_file({"<h>": v}, str(tmp_path / "h.safetensors"))
    r = fix_embedding(tmp_path / "h.safetensors", tiny_sd_pipeline_shared, "square", tmp_path / "h2.safetensors",
                      rotation=0.5, scale=1.0)
    g = read_embedding_file(tmp_path / "h2.safetensors")
    c = tiny_sd_pipeline_shared.text_encoder.get_input_embeddings().weight.detach()[
        class_word_id(tiny_sd_pipeline_shared.tokenizer, "square")]
    assert g.dtype == torch.float16 and torch.equal(g.rows, slerp_adjust(v, c, 0.5, 1.0).half())
    assert r.ratio_after == pytest.approx((1.0, 1.0), abs=2e-3)  # scale 1: the class word's norm (fp16 rounding)


def test_fix_writes_nothing_on_bad_input(tiny_sd_pipeline_shared, tmp_path):
    pipe = tiny_sd_pipeline_shared
    src, _ = _write(tmp_path, "diffusers", _rows())
    before = src.read_bytes()
    with pytest.raises(EmbeddingFileError, match="never overwrites its input"):
        fix_embedding(src, pipe, "square", src)
    with pytest.raises(EmbeddingFileError, match="never overwrites its input"):
        fix_embedding(src, pipe, "square", tmp_path)  # a folder: the input's own name inside it
    with pytest.raises(ValueError, match="tokenizes to"):
        fix_embedding(src, pipe, "squarecircle", tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="rotation must be"):
        fix_embedding(src, pipe, "square", tmp_path / "o.safetensors", rotation=2.0)
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(EmbeddingFileError, match="--force"):
        fix_embedding(src, pipe, "square", tmp_path / "exists.safetensors")
    assert src.read_bytes() == before and not (tmp_path / "o.safetensors").exists()
    assert (tmp_path / "exists.safetensors").read_bytes() == b"x" and list(tmp_path.glob(".*.tmp")) == []


def test_load_text_model_reads_the_shapesworld_encoder_only():
    tokenizer, encoder = load_text_model("shapesworld")
    assert encoder.get_input_embeddings().weight.shape[-1] == 128 and tokenizer("square")["input_ids"]
    r = inspect_embedding(CHECKERS, (tokenizer, encoder), "square", model_name="shapesworld")
    assert r.rows[0].name == "<checkers>" and r.collapsed and "--model" not in r.to_text()

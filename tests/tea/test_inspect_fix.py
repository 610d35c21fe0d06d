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
from persviz.tea.inspect_file import folder_text, inspect_embedding, inspect_folder, load_text_model
from persviz.tea.pipeline import tea
from tests.tool_formats import a1111_image_embedding, a1111_load, kohya_load, kohya_save, original_ti_save

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


# ----------------------------------------------------------------------------- issue 21 / 20: other tools' files


@pytest.mark.parametrize("kind", ["a1111-image-text", "a1111-image-pixels", "kohya-step", "kohya-pt-fp16",
                                  "textual-inversion"])
def test_fixed_foreign_files_load_in_the_loaders(tiny_sd_pipeline_shared, tmp_path, kind):
    """fix on each tool's file (writers: tests/tool_formats.py) gives tea's rows; the fixed file loads in diffusers'
    load_textual_inversion (the same image as tea), in kohya's load_weights checks and A1111's load_from_file checks
    (reproduced in tests/tool_formats.py, marked so) where those tools can read the format."""
    v = _rows(2)
    if kind.startswith("a1111-image"):
        src = a1111_image_embedding(tmp_path / "cat-20.png", v, "cat-20", 19, text_chunk=kind.endswith("text"))
        out = tmp_path / "fixed"
        out.mkdir()
    elif kind == "kohya-step":
        src = kohya_save(tmp_path / "cat-step00000020.safetensors", v, "<cat>")
        out = tmp_path / "fixed.safetensors"
    elif kind == "kohya-pt-fp16":
        v = v.half()
        src = kohya_save(tmp_path / "cat.pt", v, "cat", torch.float16)
        out = tmp_path / "fixed.pt"
    else:
        src = original_ti_save(tmp_path / "embeddings_gs-99.pt", v)
        out = tmp_path / "fixed.pt"
    result = fix_embedding(src, tiny_sd_pipeline_shared, "square", out, token="<cat>")
    fixed = read_embedding_file(result.out)
    if kind.startswith("a1111-image"):  # a picture becomes a portable float32 safetensors named after the input
        assert result.out == out / "cat-20.safetensors" and fixed.format == "diffusers" and "A1111" in result.to_text()
    else:
        assert fixed.format == read_embedding_file(src).format and fixed.dtype == v.dtype
    c = tiny_sd_pipeline_shared.text_encoder.get_input_embeddings().weight.detach()[
        class_word_id(tiny_sd_pipeline_shared.tokenizer, "square")]
    assert torch.equal(fixed.rows.float(), slerp_adjust(v, c, *DEFAULTS["textual_inversion"].values()).to(v.dtype).float())
    if kind == "textual-inversion":  # diffusers' and kohya's torch.load (weights_only under torch >= 2.6) refuse it
        with pytest.raises(Exception, match="ParameterDict"):
            kohya_load(result.out)
        return
    assert torch.equal(kohya_load(result.out).float(), fixed.rows.float())
    assert torch.equal(a1111_load(result.out)[1], fixed.rows.float())
    prompt = "a <cat> on a gray background"
    with_tea, loaded = copy.deepcopy(tiny_sd_pipeline_shared), copy.deepcopy(tiny_sd_pipeline_shared)
    with_tea.load_textual_inversion({"<cat>": v.float()}, token="<cat>")
    loaded.load_textual_inversion(str(result.out), token="<cat>")
    with tea(with_tea, "<cat>", "square"):
        a = _gen(with_tea, prompt)
    assert float(np.abs(a - _gen(loaded, prompt)).max()) <= (1e-6 if v.dtype == torch.float32 else 0.1)


def test_broken_rows_are_diagnosed_and_refused(tiny_sd_pipeline_shared, tmp_path):
    v = _rows(2)
    v[1, 3] = float("nan")
    path, _ = _write(tmp_path, "diffusers", v)
    r = inspect_embedding(path, tiny_sd_pipeline_shared, class_word="square")
    assert r.broken == ["<cat>_1"] and r.to_dict()["broken"] == ["<cat>_1"]
    text = r.to_text()
    assert "the embedding is broken: <cat>_1 hold NaN or Inf" in text and "no norm drift" not in text
    assert "NaN/Inf" in text.splitlines()[-3]
    v[1, 3] = float("inf")
    safetensors.torch.save_file({"<cat>": v}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(EmbeddingFileError, match="is broken: <cat>_1 hold NaN or Inf"):
        fix_embedding(tmp_path / "inf.safetensors", tiny_sd_pipeline_shared, "square", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_long_embedding_prints_its_edges_and_the_statistics_of_all(tiny_sd_pipeline_shared, tmp_path):
    v = _rows(40, scale=0.01)
    v[20] *= 1000  # the only drifted row sits in the part left out: the statistics must still show it
    path, _ = _write(tmp_path, "diffusers", v)
    r = inspect_embedding(path, tiny_sd_pipeline_shared, class_word="square")
    lines = r.to_text().splitlines()
    rows = [ln.split()[0] for ln in lines if ln.startswith("<cat>")]
    assert rows == ["<cat>"] + [f"<cat>_{i}" for i in range(1, 8)] + [f"<cat>_{i}" for i in range(32, 40)]
    assert any("24 rows left out" in ln for ln in lines)
    stats = next(ln for ln in lines if ln.startswith("all "))
    norms = v.norm(dim=-1).double()
    assert f"max {float(norms.max()):.3f}" in stats and f"median {float(norms.median()):.3f}" in stats
    assert "the norm of <cat>_20 lies beyond" in lines[-1]  # the diagnosis names it
    many = inspect_embedding(path, tiny_sd_pipeline_shared, class_word="square")
    object.__setattr__(many, "rows", tuple(type(x)(**{**x.__dict__, "percentile": 100.0}) for x in many.rows))
    assert "<cat>_7 and 32 more rows lies beyond" in many.to_text().splitlines()[-1]  # at most 8 names
    assert len(lines) < 40 and len(r.to_dict()["rows"]) == 40


def test_inspect_lists_a_folder_of_several_embeddings(tiny_sd_pipeline_shared, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _rows(1)}, "name": "candy", "step": 3000},
               folder / "candy.pt")
    kohya_save(folder / "dog.safetensors", _rows(2, scale=0.01), "dog")
    a1111_image_embedding(folder / "cat-20.png", _rows(1), "cat-20", 19)
    safetensors.torch.save_file({"<w>": torch.ones(1, 16)}, str(folder / "wide.safetensors"))
    found = inspect_folder(folder, tiny_sd_pipeline_shared)
    assert [p.name for p, _ in found] == ["candy.pt", "cat-20.png", "dog.safetensors", "wide.safetensors"]
    text = folder_text(folder, found)
    assert "cat-20.png: a1111-image" in text and "step 20" in text and "dog.safetensors: kohya" in text
    assert "candy.pt: a1111" in text and "step 3000" in text and "wide.safetensors: not read" in text
    assert "norm drift" in text and "no norm drift" in text

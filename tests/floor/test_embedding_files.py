"""persviz.embedding_files: one load test per foreign format, each fixture written (D=32, in tmp_path) the way the
tool itself writes it; detection by content; errors; write_like keeps format, container, dtype and metadata.

Sources of the fixtures' save code (reproduced, since the scripts cannot run here):
- diffusers examples/textual_inversion/textual_inversion.py, ``save_progress``:
  ``safetensors.torch.save_file({placeholder: weight[min(ids):max(ids)+1]}, path, metadata={"format": "pt"})`` to
  ``learned_embeds.safetensors`` and ``learned_embeds-steps-{global_step}.safetensors``; ``torch.save`` of the same
  dict to ``.bin`` with ``--no_safe_serialization``.
- diffusers examples/custom_diffusion/train_custom_diffusion.py, ``save_new_embed``:
  ``safetensors.torch.save_file({token: weight[id]}, f"{output_dir}/{token}.bin", metadata={"format": "pt"})``.
- AUTOMATIC1111 modules/textual_inversion/textual_inversion.py, ``Embedding.save``: ``torch.save({"string_to_token":
  {"*": 265}, "string_to_param": {"*": vec}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}, file)``.
- kohya-ss sd-scripts train_textual_inversion.py, ``save_weights``: ``{"emb_params": embs}`` to .safetensors (A1111
  reads it too); SDXL (sdxl_train_textual_inversion.py): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
"""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from persviz.embedding_files import (EmbeddingFileError, check_fits, read_embedding_file, read_embedding_folder,
                                     sniff_container, summary, tool_step, write_like, write_portable)
from persviz.image_embeddings import decode_pixels, lcg_bytes
from persviz.paths import SHAPESWORLD_DIR
from tests.tool_formats import (a1111_image_embedding, a1111_load, kohya_load, kohya_run, kohya_save,
                                original_ti_save, preview)

D = 32


def rows(n=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g).to(dtype)


def diffusers_save_progress(path, token, embeds, safe=True):
    """diffusers' textual_inversion.py save_progress (see the module docstring)."""
    if safe:
        safetensors.torch.save_file({token: embeds.detach().cpu()}, str(path), metadata={"format": "pt"})
    else:
        torch.save({token: embeds.detach().cpu()}, path)
    return path


def custom_diffusion_save_new_embed(folder, token, row):
    """diffusers' train_custom_diffusion.py save_new_embed with its default safe_serialization=True."""
    path = folder / f"{token}.bin"
    safetensors.torch.save_file({token: row}, str(path), metadata={"format": "pt"})
    return path


def a1111_save(path, name, vec, step=500, legacy=False):
    """A1111's Embedding.save (legacy: a torch file from before the zip format)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": step,
            "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    torch.save(data, path, _use_new_zipfile_serialization=not legacy)
    return path


# ----------------------------------------------------------------------------- one test per format


def test_diffusers_final_file_multi_vector(tmp_path):
    v = rows(3)
    f = read_embedding_file(diffusers_save_progress(tmp_path / "learned_embeds.safetensors", "<cat>", v))
    assert (f.format, f.container, f.token, f.dtype) == ("diffusers", "safetensors", "<cat>", torch.float32)
    assert torch.equal(f.rows, v) and f.n_vectors == 3 and f.width == D
    assert f.row_names == ["<cat>", "<cat>_1", "<cat>_2"]
    assert f.metadata == {"safetensors:format": "pt"} and "step" not in f.metadata


def test_diffusers_snapshot_names_its_step(tmp_path):
    f = read_embedding_file(diffusers_save_progress(tmp_path / "learned_embeds-steps-500.safetensors", "<cat>", rows()))
    assert f.format == "diffusers" and f.metadata["step"] == 500
    shipped = read_embedding_file(
        SHAPESWORLD_DIR / "concepts/checkers/textual_inversion/learned_embeds-steps-3000.safetensors")
    assert (shipped.token, shipped.metadata["step"], tuple(shipped.rows.shape)) == ("<checkers>", 3000, (1, 128))


def test_diffusers_bin_is_a_torch_zip_and_a_folder_reads_its_file(tmp_path):
    v = rows(2)
    diffusers_save_progress(tmp_path / "learned_embeds.bin", "<cat>", v, safe=False)
    f = read_embedding_file(tmp_path)
    assert (f.format, f.container, f.path.name) == ("diffusers", "torch-zip", "learned_embeds.bin")
    assert torch.equal(f.rows, v)


def test_diffusers_per_row_names_are_one_multi_vector_token(tmp_path):
    v = rows(2)
    safetensors.torch.save_file({"<cat>": v[0], "<cat>_1": v[1]}, str(tmp_path / "x.safetensors"))
    f = read_embedding_file(tmp_path / "x.safetensors")
    assert f.token == "<cat>" and torch.equal(f.rows, v)


def test_custom_diffusion_bin_holds_safetensors_bytes(tmp_path):
    row = rows()[0]
    path = custom_diffusion_save_new_embed(tmp_path, "<new1>", row)
    assert path.read_bytes()[8:9] == b"{"
    f = read_embedding_file(path)
    assert (f.format, f.container, f.token) == ("custom-diffusion", "safetensors", "<new1>")
    assert torch.equal(f.rows, row[None])


@pytest.mark.parametrize("legacy", [False, True])
def test_a1111_pt(tmp_path, legacy):
    vec = rows(2, dtype=torch.float16)
    f = read_embedding_file(a1111_save(tmp_path / "mycat.pt", "my-cat", vec, legacy=legacy))
    assert (f.format, f.container) == ("a1111", "torch-pickle" if legacy else "torch-zip")
    assert f.token == "my-cat" and f.dtype == torch.float16 and torch.equal(f.rows, vec)
    assert f.metadata["step"] == 500 and f.metadata["sd_checkpoint_name"] == "v1-5-pruned-emaonly"


def test_a1111_kohya_safetensors_named_by_the_file(tmp_path):
    embs = rows(4)
    safetensors.torch.save_file({"emb_params": embs}, str(tmp_path / "kohya-cat.safetensors"),
                                metadata={"ss_output_name": "kohya-cat"})
    f = read_embedding_file(tmp_path / "kohya-cat.safetensors")
    assert (f.format, f.token, f.n_vectors) == ("kohya", "kohya-cat", 4)
    assert f.metadata["safetensors:ss_output_name"] == "kohya-cat"
    assert read_embedding_file(tmp_path / "kohya-cat.safetensors", token="<k>").token == "<k>"


def test_sdxl_is_described_and_refused_against_an_sd1_model(tmp_path):
    safetensors.torch.save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)},
                                str(tmp_path / "xl.safetensors"))
    f = read_embedding_file(tmp_path / "xl.safetensors")
    assert f.format == "sdxl" and {k: tuple(v.shape) for k, v in f.parts.items()} == {
        "clip_l": (2, 768), "clip_g": (2, 1280)}
    assert "clip_g [2, 1280]" in f.describe() and summary(f)["parts"]["clip_g"] == [2, 1280]
    with pytest.raises(EmbeddingFileError, match="SDXL.*768-wide.*SD 1.x"):
        check_fits(f, 768)
    with pytest.raises(EmbeddingFileError, match="SDXL"):
        write_like(f, f.rows, tmp_path / "out.safetensors")


# ----------------------------------------------------------------------------- content, not suffix; errors


def test_the_content_decides_not_the_suffix(tmp_path):
    v = rows()
    safetensors.torch.save_file({"<a>": v}, str(tmp_path / "a.pt"))
    torch.save({"<b>": v}, tmp_path / "b.safetensors")
    assert read_embedding_file(tmp_path / "a.pt").container == "safetensors"
    assert read_embedding_file(tmp_path / "b.safetensors").container == "torch-zip"
    assert sniff_container(struct.pack("<Q", 2) + b"{}", 10) == "safetensors"
    assert sniff_container(b"PK\x03\x04" + b"\0" * 8, 100) == "torch-zip"
    assert sniff_container(b"\x80\x02" + b"\0" * 8, 100) == "torch-pickle"
    assert sniff_container(b"hello world", 11) is None


def test_width_against_the_model(tmp_path):
    f = read_embedding_file(diffusers_save_progress(tmp_path / "e.safetensors", "<e>", rows()))
    check_fits(f, D)
    with pytest.raises(EmbeddingFileError, match="width 32 .* 64 wide.*trained on another model"):
        check_fits(f, 64)
    f768 = read_embedding_file(diffusers_save_progress(tmp_path / "f.safetensors", "<f>", torch.ones(1, 768)))
    with pytest.raises(EmbeddingFileError, match="SD 1.x.*--model stable-diffusion-v1-5"):
        check_fits(f768, 128)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(EmbeddingFileError, match="no file at"):
        read_embedding_file(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("hello, not an embedding")
    with pytest.raises(EmbeddingFileError, match="neither a safetensors, a torch file nor an A1111 image embedding"):
        read_embedding_file(tmp_path / "notes.pt")
    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(EmbeddingFileError, match="git lfs pull"):
        read_embedding_file(tmp_path / "lfs.safetensors")
    safetensors.torch.save_file({"<a>": rows()[0], "<b>": rows()[0]}, str(tmp_path / "two.safetensors"))
    with pytest.raises(EmbeddingFileError, match="2 tokens"):
        read_embedding_file(tmp_path / "two.safetensors")
    torch.save({"foo": "bar", "step": 3}, tmp_path / "odd.pt")
    with pytest.raises(EmbeddingFileError, match="unknown layout"):
        read_embedding_file(tmp_path / "odd.pt")
    with pytest.raises(EmbeddingFileError, match="folder without"):
        read_embedding_file(tmp_path)


# ----------------------------------------------------------------------------- writing back alike


@pytest.mark.parametrize("kind", ["diffusers", "diffusers-bin", "per-row", "custom-diffusion", "a1111", "a1111-legacy",
                                  "kohya"])
def test_write_like_keeps_the_format(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    if kind == "diffusers":
        path = diffusers_save_progress(src / "learned_embeds.safetensors", "<c>", rows(2))
    elif kind == "diffusers-bin":
        path = diffusers_save_progress(src / "learned_embeds.bin", "<c>", rows(2, dtype=torch.float16), safe=False)
    elif kind == "per-row":
        path = src / "pr.safetensors"
        safetensors.torch.save_file({"<c>": rows(2)[0], "<c>_1": rows(2)[1]}, str(path))
    elif kind == "custom-diffusion":
        path = custom_diffusion_save_new_embed(src, "<new1>", rows()[0])
    elif kind in ("a1111", "a1111-legacy"):
        path = a1111_save(src / "c.pt", "c", rows(2, dtype=torch.float16), legacy=kind == "a1111-legacy")
    else:
        path = src / "k.safetensors"
        safetensors.torch.save_file({"emb_params": rows(2)}, str(path), metadata={"ss_x": "1"})
    f = read_embedding_file(path)
    new = f.rows.float() * 0.5 + 1.0
    out = write_like(f, new, tmp_path / ("out" + path.suffix))
    g = read_embedding_file(out)
    assert (g.format, g.container, g.dtype) == (f.format, f.container, f.dtype)
    assert g.token == ("out" if kind == "kohya" else f.token)  # emb_params files are named after the file
    assert torch.equal(g.rows, new.to(f.dtype)) and g.metadata == f.metadata
    assert set(g.raw) == set(f.raw)
    for k in f.raw:
        if isinstance(f.raw[k], torch.Tensor):
            assert g.raw[k].shape == f.raw[k].shape
        elif k != "string_to_param":
            assert g.raw[k] == f.raw[k]
    assert list(tmp_path.glob(".*.tmp")) == []


# ----------------------------------------------------------------------------- issue 21: every tool's files
# Fixture writers: tests/tool_formats.py (own code reproducing each tool's format; upstream files and commits there).


def test_a1111_lcg_is_the_reference_stream():
    """image_embedding.py's own self-test lists the first values; the first by hand: 1013904223 = 255 * 3976094 + 253."""
    assert lcg_bytes(100).tolist()[:13] == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177]
    assert lcg_bytes(100).tolist()[91:] == [204, 86, 73, 222, 44, 198, 118, 240, 97]


def test_a_hand_built_pixel_block_decodes():
    """Two rows, payload zlib('{"name": "x"}'): every pixel computed here nibble by nibble, no writer involved."""
    payload = np.frombuffer(zlib.compress(b'{"name": "x"}', 9), np.uint8)
    h, n = 2, len(payload)
    size = n + (h - n % h)
    size = size + (h * 3 - size % (h * 3))
    key = lcg_bytes(size) & 0x0F
    low = (np.resize(payload & 0x0F, size) ^ key) | 0x10  # a high nibble of 1: every channel > 0, as A1111's dots
    high = (np.resize(payload >> 4, size) ^ key) | 0x20
    middle = np.full((h, 2, 3), 0x33, np.uint8)
    black = np.zeros((h, 1, 3), np.uint8)
    pixels = np.concatenate([low.reshape(h, -1, 3), black, middle, black, high.reshape(h, -1, 3)], axis=1)
    pixels = np.pad(pixels.astype(np.uint8), ((1, 1), (1, 1), (0, 0)))  # a black frame is cropped away
    assert decode_pixels(pixels) == {"name": "x"}
    assert decode_pixels(np.full((4, 4, 3), 200, np.uint8)) is None  # no black columns: no embedding


@pytest.mark.parametrize("carrier", ["text chunk", "pixels", "webp pixels"])
def test_a1111_image_embedding(tmp_path, carrier):
    vec = rows(2)
    path = tmp_path / ("candy-20.webp" if carrier == "webp pixels" else "candy-20.png")
    a1111_image_embedding(path, vec, "candy-20", 19, text_chunk=carrier == "text chunk",
                          fmt="WEBP" if carrier == "webp pixels" else "PNG")
    f = read_embedding_file(path)
    assert (f.format, f.container, f.token, f.dtype) == ("a1111-image", path.suffix[1:], "candy-20", torch.float32)
    assert f.metadata["embedded in"] == carrier.replace("webp ", "")
    assert (f.metadata["step"], f.metadata["stored_step"]) == (20, 19)  # A1111's steps_done, as in its file name
    assert torch.equal(f.rows, vec)  # JSON floats of float32 values come back exactly
    assert "Automatic1111" in f.describe()
    with pytest.raises(EmbeddingFileError, match="write_portable"):
        write_like(f, f.rows, tmp_path / "x.png")
    out = write_portable(f, f.rows * 0.5, tmp_path / "candy.safetensors")
    assert a1111_load(out)[0] == "candy" and torch.equal(a1111_load(out)[1], vec * 0.5)
    assert torch.equal(kohya_load(out), vec * 0.5)


def test_a_picture_without_an_embedding_is_one_sentence(tmp_path):
    preview().save(tmp_path / "candy-20.preview.png")
    preview().save(tmp_path / "photo.png")
    with pytest.raises(EmbeddingFileError, match="picture without an embedding .* preview image"):
        read_embedding_file(tmp_path / "photo.png")
    (tmp_path / "x.jxl").write_bytes(b"\xff\x0a" + bytes(30))
    with pytest.raises(EmbeddingFileError, match="jxl file Pillow cannot open.*pillow-jxl-plugin"):
        read_embedding_file(tmp_path / "x.jxl")


def test_kohya_files_are_kohya_with_their_token_and_step(tmp_path):
    run = kohya_run(tmp_path / "out", "zwxcat", [20, 40], lambda k: rows(2, seed=k))
    f = read_embedding_file(run / "zwxcat-step00000020.safetensors")
    assert (f.format, f.token, f.metadata["step"], f.n_vectors) == ("kohya", "zwxcat", 20, 2)
    assert "kohya-ss sd-scripts" in f.describe()
    final = read_embedding_file(run / "zwxcat.safetensors")
    assert final.token == "zwxcat" and "step" not in final.metadata
    epoch = read_embedding_file(kohya_save(tmp_path / "cat-000003.pt", rows(1), "cat", torch.float16))
    assert (epoch.format, epoch.token, epoch.dtype, epoch.metadata["epoch"]) == ("kohya", "cat", torch.float16, 3)
    titled = kohya_save(tmp_path / "renamed-step00000100.safetensors", rows(1), "<my-cat>")
    assert read_embedding_file(titled).token == "<my-cat>"  # the metadata's title wins over the file name


def test_the_original_textual_inversion_pt_through_an_allow_list(tmp_path):
    path = original_ti_save(tmp_path / "embeddings_gs-6099.pt", rows(2))
    with pytest.raises(Exception, match="ParameterDict"), open(path, "rb") as fh:
        torch.load(fh, weights_only=True)  # without the allow-list torch >= 2.6 refuses it
    f = read_embedding_file(path)
    assert (f.format, f.token, f.metadata["step"], f.n_vectors) == ("textual-inversion", "*", 6099, 2)
    assert torch.equal(f.rows, rows(2)) and "original Textual Inversion" in f.describe()
    out = read_embedding_file(write_like(f, f.rows * 2, tmp_path / "embeddings.pt"))
    assert out.format == "textual-inversion" and torch.equal(out.rows, rows(2) * 2)
    with pytest.raises(Exception, match="ParameterDict"):  # kohya's torch.load (weights_only by default in torch
        kohya_load(tmp_path / "embeddings.pt")  # >= 2.6) fails on this format, as the issue reports
    torch.save({"string_to_param": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a class off the list
    with pytest.raises(EmbeddingFileError, match="does not load with weights_only=True"):
        read_embedding_file(tmp_path / "module.pt")


def test_one_step_convention():
    """Each tool's number as its users see it (embedding_files' docstring), from hand-written names and stored steps."""
    a1111 = {"name": "candy-20", "step": 19}
    assert tool_step("a1111", Path("candy-20.pt"), a1111)["step"] == 20
    assert tool_step("a1111", Path("renamed.pt"), a1111)["step"] == 20  # the stored name says it too
    assert tool_step("a1111", Path("candy.pt"), {"name": "candy", "step": 3000})["step"] == 3000  # the final
    assert tool_step("diffusers", Path("learned_embeds-steps-500.safetensors"), {}) == {"step": 500}
    assert tool_step("kohya", Path("cat-step00000020.safetensors"), {}) == {"step": 20}
    assert tool_step("kohya", Path("cat-000002.safetensors"), {}) == {"epoch": 2}
    assert tool_step("textual-inversion", Path("embeddings_gs-499.pt"), {}) == {"step": 499}


def test_mixed_widths_and_several_embeddings_are_sentences(tmp_path):
    safetensors.torch.save_file({"<t>": torch.zeros(D), "<t>_1": torch.zeros(D + 8)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"mixed widths \[32, 40\]"):
        read_embedding_file(tmp_path / "m.safetensors")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    a1111_save(folder / "candy.pt", "candy", rows(1))
    kohya_save(folder / "dog.safetensors", rows(2), "dog")
    (folder / "candy.pt.optim").write_bytes((folder / "candy.pt").read_bytes())  # A1111's optimizer state: skipped
    with pytest.raises(EmbeddingFileError, match=r"holds 2 embedding files \(candy.pt, dog.safetensors\)"):
        read_embedding_file(folder)
    found = read_embedding_folder(folder)
    assert [(p.name, f.format, f.token) for p, f in found] == [("candy.pt", "a1111", "candy"),
                                                               ("dog.safetensors", "kohya", "dog")]

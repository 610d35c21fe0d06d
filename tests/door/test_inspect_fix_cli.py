"""`persviz inspect` and `persviz fix` through persviz.cli.main, on the shipped ShapesWorld model and <checkers> token:
the report, the repaired file, and one clear sentence (SystemExit) with nothing written for each kind of bad input."""
import json

import pytest
import safetensors.torch
import torch

from persviz.cli import main
from persviz.embedding_files import read_embedding_file
from persviz.paths import SHAPESWORLD_DIR
from tests.tool_formats import a1111_image_embedding, kohya_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHECKERS = str(SHAPESWORLD_DIR / "concepts/checkers/textual_inversion/learned_embeds.safetensors")


def test_inspect_prints_the_diagnosis(capsys):
    report = main(["inspect", CHECKERS, "--class-word", "square"])
    out = capsys.readouterr().out
    for part in ("diffusers (safetensors)", "'<checkers>'", "1 x 128", "model   shapesworld", "p95", "|V*|/|c|",
                 "nearest words", "diagnosis:", "persviz fix"):
        assert part in out, part
    assert report.rows[0].ratio > 1 and report.collapsed
    main(["inspect", CHECKERS, "--json", "--nearest", "2"])
    data = json.loads(capsys.readouterr().out)
    assert data["file"]["token"] == "<checkers>" and len(data["rows"][0]["nearest"]) == 2


def test_fix_writes_a_new_file_of_the_same_format(tmp_path, capsys):
    out = tmp_path / "checkers_tea.safetensors"
    result = main(["fix", CHECKERS, "--class-word", "square", "--out", str(out), "--rotation", "0.3"])
    assert "wrote" in capsys.readouterr().out and result.rotation == 0.3 and result.scale == 0.5
    src, new = read_embedding_file(CHECKERS), read_embedding_file(out)
    assert (new.format, new.container, new.token, new.dtype) == (src.format, src.container, src.token, src.dtype)
    assert not torch.equal(new.rows, src.rows)
    with pytest.raises(SystemExit, match="--force"):
        main(["fix", CHECKERS, "--class-word", "square", "--out", str(out)])
    main(["fix", CHECKERS, "--class-word", "square", "--out", str(out), "--force"])


def _bad_inputs(tmp_path):
    (tmp_path / "notes.pt").write_text("not an embedding")
    safetensors.torch.save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)},
                                str(tmp_path / "xl.safetensors"))
    safetensors.torch.save_file({"<w>": torch.ones(1, 32)}, str(tmp_path / "w32.safetensors"))
    return [
        ([str(tmp_path / "missing.safetensors")], "no file at"),
        ([str(tmp_path / "notes.pt")], "neither a safetensors, a torch file nor an A1111 image embedding"),
        ([str(tmp_path / "xl.safetensors")], "SDXL embedding .* SD 1.x"),
        ([str(tmp_path / "w32.safetensors")], "width 32 .* 128 wide: the embedding was trained on another model"),
        ([CHECKERS, "--class-word", "squarecircle"], "tokenizes to"),
        ([CHECKERS, "--model", str(tmp_path / "no-such-model")], "exists|not in the local Hugging Face cache"),
    ]


@pytest.mark.parametrize("command", ["inspect", "fix"])
def test_bad_input_is_one_clear_sentence_and_writes_nothing(tmp_path, command):
    cases = _bad_inputs(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        extra = []
        if command == "fix":
            extra = ["--out", str(tmp_path / "fixed.safetensors")]
            if "--class-word" not in args:
                extra += ["--class-word", "square"]
        with pytest.raises(SystemExit, match=message) as err:
            main([command, *args, *extra])
        assert str(err.value.code).startswith("persviz ") and "\n" not in str(err.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fix_refuses_its_input_and_a_bad_knob(tmp_path):
    with pytest.raises(SystemExit, match="never overwrites its input"):
        main(["fix", CHECKERS, "--class-word", "square", "--out", CHECKERS])
    with pytest.raises(SystemExit, match="rotation must be a number in"):
        main(["fix", CHECKERS, "--class-word", "square", "--out", str(tmp_path / "o.safetensors"), "--rotation", "3"])
    assert list(tmp_path.iterdir()) == []


def test_image_embeddings_folders_and_broken_files_through_the_command(tmp_path, capsys):
    """An A1111 image embedding (writer: tests/tool_formats.py) inspected and fixed into a portable .safetensors;
    a folder of several embeddings listed; NaN rows refused by fix in one sentence."""
    rows = read_embedding_file(CHECKERS).rows
    folder = tmp_path / "embeddings"
    folder.mkdir()
    png = a1111_image_embedding(folder / "checkers-20.png", rows, "checkers-20", 19, text_chunk=False)
    kohya_save(folder / "small.safetensors", rows * 0.01, "small")
    report = main(["inspect", str(png), "--class-word", "square"])
    out = capsys.readouterr().out
    assert "a1111-image (png)" in out and "step 20" in out and "Automatic1111" in out and report.collapsed
    result = main(["fix", str(png), "--class-word", "square", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert result.out == tmp_path / "checkers-20.safetensors" and "A1111" in out and "diffusers" in out
    assert read_embedding_file(result.out).token == "checkers-20"
    main(["inspect", str(folder)])
    out = capsys.readouterr().out
    assert "2 embedding file(s)" in out and "checkers-20.png: a1111-image" in out and "small.safetensors: kohya" in out
    bad = rows.clone()
    bad[0, 0] = float("nan")
    safetensors.torch.save_file({"<nan>": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(SystemExit, match="is broken: <nan> hold NaN or Inf"):
        main(["fix", str(tmp_path / "nan.safetensors"), "--class-word", "square", "--out", str(tmp_path / "n2.safetensors")])
    assert not (tmp_path / "n2.safetensors").exists()

"""Token-level TEA on SDXL, per encoder (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48): each V* row moves
toward its own encoder's class-word row (checked against a hand-worked SLERP), ``persviz fix`` writes the adjusted
clip_l / clip_g file in the input's layout, and that file loaded per encoder gives the images ``tea()`` gives."""
import math

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from tests.helpers import hand_slerp
from persviz.embedding_files import EmbeddingFileError, SDXL_PAIR, read_embedding_file
from persviz.embeddings import load_learned_token
from persviz.families import assemble_pipeline, text_stack
from persviz.hub_models import SD15, SDXL_BASE
from persviz.tea import tea
from persviz.tea.adjust import slerp_adjust
from persviz.tea.fix_file import fix_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


def test_the_slerp_against_a_hand_worked_case():
    # v = (2, 0), c = (0, 1), rotation 0.5, scale 0.5: m = 1.5, theta = pi/2, so 1.5 (sin(pi/4), sin(pi/4))
    out = slerp_adjust(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5, 0.5)
    torch.testing.assert_close(out, torch.tensor([1.5 / math.sqrt(2), 1.5 / math.sqrt(2)]))
    g = torch.Generator().manual_seed(0)
    v, c = torch.randn(48, generator=g), torch.randn(48, generator=g)
    torch.testing.assert_close(slerp_adjust(v.double(), c.double(), 0.2, 0.5), hand_slerp(v, c, 0.2, 0.5))


def sdxl_file(path, dtype=torch.float32, rows=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    parts = {"clip_l": torch.randn(rows, 32, generator=g).to(dtype), "clip_g": torch.randn(rows, 48, generator=g).to(dtype)}
    safetensors.torch.save_file(parts, str(path), metadata={"modelspec.title": "mytok", "ss_note": "kept"})
    return parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fix_moves_each_part_toward_its_own_encoders_class_row(sdxl, tmp_path, dtype):
    parts = sdxl_file(tmp_path / "mytok.safetensors", dtype, rows=2)
    result = fix_embedding(tmp_path / "mytok.safetensors", sdxl, "dog", tmp_path / "fixed.safetensors")
    with safetensors.safe_open(str(tmp_path / "fixed.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.metadata() == {"modelspec.title": "mytok", "ss_note": "kept"}  # the input's layout and metadata
        fixed = {k: f.get_tensor(k) for k in f.keys()}
    for e in text_stack(sdxl):
        c = e.word_row("dog")
        assert fixed[e.name].dtype == dtype and fixed[e.name].shape == parts[e.name].shape
        for i in range(2):
            want = hand_slerp(parts[e.name][i].float(), c, 0.2, 0.5)  # toward this encoder's own class row
            torch.testing.assert_close(fixed[e.name][i].double(), want, atol=2e-3 if dtype == torch.float16 else 1e-6,
                                       rtol=1e-3 if dtype == torch.float16 else 1e-6)
    assert [p.encoder for p in result.parts] == ["clip_l", "clip_g"] and result.parts[1].width == 48
    assert all(a > b for p in result.parts for a, b in zip(p.cosine_after, p.cosine_before))
    assert read_embedding_file(tmp_path / "fixed.safetensors").format == "sdxl"
    text = result.to_text()
    assert "clip_l row 1" in text and "clip_g row 0" in text and "TEA toward 'dog' in each encoder" in text


def generate(pipe, prompt="a photo of a <v> on the grass"):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def load(pipe, parts):
    for e in text_stack(pipe):
        load_learned_token(pipe, parts[e.name], token="<v>", text=e)


def unload(pipe):
    for e in text_stack(pipe):
        pipe.unload_textual_inversion("<v>", tokenizer=e.tokenizer, text_encoder=e.encoder)


def test_the_fixed_file_loaded_per_encoder_gives_the_images_tea_gives(sdxl, tmp_path):
    parts = sdxl_file(tmp_path / "v.safetensors")
    fix_embedding(tmp_path / "v.safetensors", sdxl, "dog", tmp_path / "fixed.safetensors", rotation=0.4, scale=0.5)
    load(sdxl, parts)
    try:
        plain = generate(sdxl)
        with tea(sdxl, "<v>", "dog", rotation=0.4, scale=0.5) as adj:
            assert [a.encoder for a in adj.per_encoder] == ["clip_l", "clip_g"]
            for a, e in zip(adj.per_encoder, text_stack(sdxl)):  # each encoder's row toward its own class row
                torch.testing.assert_close(a.adjusted[0].double(), hand_slerp(parts[e.name][0], e.word_row("dog"),
                                                                              0.4, 0.5), atol=1e-6, rtol=1e-6)
            with_tea = generate(sdxl)
        np.testing.assert_array_equal(generate(sdxl), plain)  # restored exactly
        with tea(sdxl, "<v>", "dog", rotation=0.0, scale=0.0):
            np.testing.assert_array_equal(generate(sdxl), plain)  # rotation 0, scale 0 leaves the image as it was
    finally:
        unload(sdxl)
    fixed = safetensors.torch.load_file(str(tmp_path / "fixed.safetensors"))
    load(sdxl, fixed)
    try:
        np.testing.assert_array_equal(generate(sdxl), with_tea)
        assert not np.array_equal(with_tea, plain)
    finally:
        unload(sdxl)


def test_diffusers_sdxl_pair_becomes_one_clip_l_clip_g_file(sdxl, tmp_path):
    run = tmp_path / "ti_sdxl_run"
    run.mkdir()
    g = torch.Generator().manual_seed(3)
    l_rows, g_rows = torch.randn(1, 32, generator=g), torch.randn(1, 48, generator=g)
    safetensors.torch.save_file({"<cat>": l_rows}, str(run / SDXL_PAIR["clip_l"]))
    safetensors.torch.save_file({"<cat>": g_rows}, str(run / SDXL_PAIR["clip_g"]))
    (tmp_path / "out").mkdir()
    result = fix_embedding(run, sdxl, "dog", tmp_path / "out")
    assert result.out == tmp_path / "out" / "<cat>.safetensors" and result.written_format
    read = read_embedding_file(result.out)
    assert (read.format, read.token) == ("sdxl", "<cat>") and read.parts["clip_g"].dtype == torch.float32
    stack = text_stack(sdxl)
    torch.testing.assert_close(read.parts["clip_g"][0].double(), hand_slerp(g_rows[0], stack.by_name("clip_g")
                                                                            .word_row("dog"), 0.2, 0.5))
    with pytest.raises(EmbeddingFileError, match="is one of the input's files"):
        fix_embedding(run, sdxl, "dog", run / SDXL_PAIR["clip_g"], force=True)


def test_persviz_fix_on_the_command_line_and_the_refusals_naming_both_families(sdxl, tmp_path, capsys):
    from persviz.cli import main
    sdxl_file(tmp_path / "mytok.safetensors")
    result = main(["fix", str(tmp_path / "mytok.safetensors"), "--class-word", "dog", "--out",
                   str(tmp_path / "o.safetensors"), "--model", SDXL_BASE])
    assert "clip_g row 0" in capsys.readouterr().out and result.out.is_file()
    safetensors.torch.save_file({"<cat>": torch.ones(1, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(SystemExit, match="Stable Diffusion 1.x-style embedding.*SDXL-style model with 2 text "
                                         "encoders \\(clip_l 32 wide, clip_g 48 wide\\)"):
        main(["fix", str(tmp_path / "sd1.safetensors"), "--class-word", "dog", "--out", str(tmp_path / "x.safetensors"),
              "--model", SDXL_BASE])
    with pytest.raises(SystemExit, match="is an SDXL embedding .* one 32-wide text encoder"):
        main(["fix", str(tmp_path / "mytok.safetensors"), "--class-word", "dog", "--out",
              str(tmp_path / "y.safetensors"), "--model", SD15])
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()

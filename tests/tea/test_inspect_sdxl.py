"""persviz inspect on SDXL embedding files, diagnosed per encoder against an SDXL-architecture model (clip_l 32
wide, clip_g 48, random weights, the real CLIP tokenizer twice): every layout of the tools that write SDXL
embeddings, the numbers worked out here from each encoder's own matrix, and the sentences naming both families."""
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from persviz.embedding_files import EmbeddingFileError, read_embedding_file
from persviz.families import FAMILIES
from persviz.tea.inspect_file import inspect_stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIDTHS = {"clip_l": 32, "clip_g": 48}


@pytest.fixture(scope="module")
def xl():
    """An SDXL-like pipeline's text parts: the SDXL family's text stack of them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from persviz.sd15 import load_sd15_tokenizer

    def config(width):
        return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                              num_attention_heads=4, max_position_embeddings=77, projection_dim=width)
    torch.manual_seed(0)
    parts = SimpleNamespace(tokenizer=load_sd15_tokenizer(), tokenizer_2=load_sd15_tokenizer(),
                            text_encoder=CLIPTextModel(config(32)).eval(),
                            text_encoder_2=CLIPTextModelWithProjection(config(48)).eval())
    return FAMILIES["sdxl"].text_stack(parts)


def _parts(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=g) * (0.015 if k == "clip_l" else 1.0) for k, w in WIDTHS.items()}


def _expected(stack, name, rows, word):
    """|V*|, the share of vocabulary rows with a smaller norm, |V*|/|c| and cos(V*, c) against one encoder."""
    enc = stack.by_name(name)
    W = enc.encoder.get_input_embeddings().weight.detach()[:49408]
    c = W[enc.tokenizer.convert_tokens_to_ids(word + "</w>")]
    out = []
    for v in rows:
        n = float(v.norm())
        out.append((n, 100.0 * float((W.norm(dim=-1) < n).double().mean()), n / float(c.norm()),
                    float(torch.dot(v, c) / (v.norm() * c.norm()))))
    return out


def _layouts(tmp_path, parts):
    """A file of each SDXL layout holding `parts`, as each tool writes it."""
    out = {}
    # kohya sdxl_train_textual_inversion.py, A1111/Forge and ComfyUI: {"clip_l": [n, 768], "clip_g": [n, 1280]}
    out["kohya"] = tmp_path / "kohya" / "mytoken.safetensors"
    # diffusers' train_dreambooth_lora_sdxl_advanced.py (pivotal tuning): the same keys in <name>_emb.safetensors
    out["pivotal"] = tmp_path / "pivotal" / "run_emb.safetensors"
    for key in ("kohya", "pivotal"):
        out[key].parent.mkdir()
        safetensors.torch.save_file({k: v.contiguous() for k, v in parts.items()}, str(out[key]))
    # diffusers' textual_inversion_sdxl.py: learned_embeds.safetensors (clip_l) + learned_embeds_2.safetensors (clip_g)
    pair = tmp_path / "ti_sdxl"
    pair.mkdir()
    safetensors.torch.save_file({"<cat>": parts["clip_l"]}, str(pair / "learned_embeds.safetensors"),
                                metadata={"format": "pt"})
    safetensors.torch.save_file({"<cat>": parts["clip_g"]}, str(pair / "learned_embeds_2.safetensors"),
                                metadata={"format": "pt"})
    out["diffusers pair"] = pair
    return out


@pytest.mark.parametrize("layout", ["kohya", "pivotal", "diffusers pair"])
def test_each_layout_is_diagnosed_per_encoder_against_its_own_vocabulary(xl, tmp_path, layout):
    parts = _parts()
    f = read_embedding_file(_layouts(tmp_path, parts)[layout])
    assert f.per_encoder and {k: tuple(v.shape) for k, v in f.parts.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    reports = inspect_stack(f, xl, class_word="dog", model_name="my/xl")
    assert [r.encoder for r in reports] == ["clip_l", "clip_g"] and [r.width for r in reports] == [32, 48]
    for r in reports:
        assert (r.file["rows"], r.file["width"]) == (2, WIDTHS[r.encoder]) and r.vocab_size == 49408
        for row, (norm, pct, ratio, cos) in zip(r.rows, _expected(xl, r.encoder, parts[r.encoder], "dog")):
            assert row.norm == pytest.approx(norm, rel=1e-5) and row.percentile == pytest.approx(pct)
            assert row.ratio == pytest.approx(ratio, rel=1e-5) and row.cosine == pytest.approx(cos, abs=1e-5)
    # clip_l drawn below its vocabulary's row scale (std 0.02), clip_g far beyond: the drift shows in clip_g only
    assert [r.collapsed for r in reports] == [False, True]
    text = "\n\n".join(r.to_text() for r in reports)
    assert "text encoder clip_l 32 wide" in text and "text encoder clip_g 48 wide" in text
    assert "in clip_g, the norm of" in text and "adjusts every encoder's rows, each toward its own" in text
    assert [r.to_dict()["encoder"] for r in reports] == ["clip_l", "clip_g"]


def test_a_pair_of_different_tokens_is_refused(tmp_path):
    pair = tmp_path / "ti_sdxl"
    pair.mkdir()
    safetensors.torch.save_file({"<cat>": torch.ones(1, 32)}, str(pair / "learned_embeds.safetensors"))
    safetensors.torch.save_file({"<dog>": torch.ones(1, 48)}, str(pair / "learned_embeds_2.safetensors"))
    with pytest.raises(EmbeddingFileError, match="'<cat>'.*'<dog>'.*one token"):
        read_embedding_file(pair)


def test_an_sd1_file_against_sdxl_and_an_sdxl_file_against_sd1_name_both_families(xl, tmp_path, shapesworld_pipeline):
    safetensors.torch.save_file({"<cat>": torch.ones(1, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(EmbeddingFileError, match="one text encoder .*Stable Diffusion 1.x.* SDXL-style model with 2 "
                       "text encoders \\(clip_l 32 wide, clip_g 48 wide\\)") as info:
        inspect_stack(read_embedding_file(tmp_path / "sd1.safetensors"), xl, model_name="my/xl")
    assert "\n" not in str(info.value) and "--model stable-diffusion-v1-5/stable-diffusion-v1-5" in str(info.value)
    safetensors.torch.save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)},
                                str(tmp_path / "xl.safetensors"))
    sd1 = FAMILIES["sd1"].text_stack(shapesworld_pipeline)
    with pytest.raises(EmbeddingFileError, match="SDXL embedding .*128-wide text encoder .*SD 1.x.*--model "
                       "stabilityai/stable-diffusion-xl-base-1.0"):
        inspect_stack(read_embedding_file(tmp_path / "xl.safetensors"), sd1)
    with pytest.raises(EmbeddingFileError, match="clip_l part is 768 wide but the model's clip_l text encoder is 32"):
        inspect_stack(read_embedding_file(tmp_path / "xl.safetensors"), xl)

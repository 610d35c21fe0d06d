"""An SDXL concept folder through the measuring commands (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48):
cross-attention maps and the leak on SDXL's UNet with the image unchanged, ``persviz study``, ``persviz sweep`` and
``persviz finexl explain`` on a concept folder holding a Textual Inversion run (a row per encoder) and a
DreamBooth-LoRA run with the text encoders on.

References: the images generated without the collector (max |difference| 0), softmax(Q K^T / sqrt(d)) times V against
the attention layer's own output on encode_prompt's embeddings, |V*|/|c| by hand from the run's snapshot files and
each encoder's class-word row, TEA at rotation 0, scale 0 scoring exactly as the untouched token."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.helpers import photo_folder
from persviz.attention import attention_maps, cross_attention_layers, probabilities
from persviz.cli import main as cli_main
from persviz.families import assemble_pipeline, text_stack
from persviz.hub_models import SDXL_BASE
from persviz.methods import get_method
from persviz.trainers.concept_runs import train_concept

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a photo of a dog on the grass"
GRID = ["--steps", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


@pytest.fixture(scope="module")
def concept(sdxl, tmp_path_factory):
    """A concept folder on SDXL: Textual Inversion ('<d>', 2 steps) and DreamBooth-LoRA with the text encoders on."""
    root = tmp_path_factory.mktemp("sdxl_concept")
    photos = photo_folder(root / "photos")
    for method in ("textual_inversion", "dreambooth"):
        train_concept(method, photos, "dog", "<d>", root / "xl", model=SDXL_BASE, pipe=sdxl, steps=2, save_every=1,
                      resolution=64, batch_size=1, lr=5e-2, train_text_encoder=True, progress=False)
    return root / "xl"


def images(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                **kw).images


@pytest.mark.parametrize("lora", [False, True])
def test_attention_maps_leave_the_sdxl_image_unchanged_and_the_leak_is_the_maps_mass_outside(sdxl, concept, lora):
    db = get_method("dreambooth")
    with db.loaded(sdxl, concept / "dreambooth") if lora else _nothing():
        processors = {k: v.processor for k, v in cross_attention_layers(sdxl.unet).items()}
        plain = images(sdxl)
        with attention_maps(sdxl, words=["dog", "grass"]) as m:
            inside = images(sdxl)
        assert float(np.abs(plain - inside).max()) == 0.0
        after = {k: v.processor for k, v in cross_attention_layers(sdxl.unet).items()}
        assert after.keys() == processors.keys() and all(after[k] is processors[k] for k in processors)
    assert m.maps["dog"].shape == (1, 8, 8) and float(m.maps["dog"].sum()) > 0  # 64 px: an 8 x 8 latent
    assert m.n_layers == len(processors) and len(m.timesteps) >= 2
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    a = m.maps["dog"][0].double()
    assert float(m.leak("dog", left)["all"][0]) == pytest.approx(float(a[:, 4:].sum() / a.sum()), rel=1e-6)
    assert float(m.leak("dog", torch.ones(8, 8))["all"][0]) == pytest.approx(0.0, abs=1e-7)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_the_recomputed_probabilities_reproduce_an_sdxl_cross_attention_layer(sdxl):
    """On SDXL's 80-wide concatenated prompt states (encode_prompt's), softmax(Q K^T scale) V is the layer's output."""
    emb = sdxl.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)[0]
    layers = list(cross_attention_layers(sdxl.unet).values())
    assert {layer.to_k.in_features for layer in layers} == {80}
    attn = layers[-1]
    hs = torch.randn(1, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = attn(hs, encoder_hidden_states=emb)
        p = probabilities(attn.processor, attn, hs, emb)
        v = attn.to_v(emb).view(1, 77, attn.heads, -1).transpose(1, 2)
        mixed = (p.view(1, attn.heads, 16, 77) @ v).transpose(1, 2).reshape(1, 16, -1)
        torch.testing.assert_close(attn.to_out[1](attn.to_out[0](mixed)), out, rtol=1e-5, atol=1e-5)
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)


def test_persviz_study_on_an_sdxl_concept_folder(sdxl, concept):
    cli_main(["study", str(concept), "--probes", "2", "--every", "1", *GRID])
    study = json.loads((concept / "study" / "study.json").read_text())
    text = study["text"]
    assert text["step"] == [1, 2]
    for e in text_stack(sdxl):  # |V*| / |c| per encoder, by hand from the snapshots and the encoder's 'dog' row
        c = e.word_row("dog").double()
        for i, step in enumerate(text["step"]):
            v = safetensors.torch.load_file(
                str(concept / "textual_inversion" / f"learned_embeds-steps-{step}.safetensors"))[e.name][0].double()
            assert text[f"{e.name}_norm_ratio"][i] == pytest.approx(float(v.norm() / c.norm()), rel=1e-6)
        assert (concept / "study" / f"{e.name}_norm_ratio.png").is_file()
    assert "inter_l2" in text and "clip_g_pooled_inter_l2" in text  # the concatenated state, the pooled embedding
    assert set(study["tea_table"]) >= {"textual_inversion", "textual_inversion TEA", "dreambooth", "dreambooth TEA",
                                       "dreambooth TEA base anchor"}
    assert (concept / "study" / "impacts.png").is_file() and (concept / "study" / "shift_grid.png").is_file()


def test_persviz_sweep_on_an_sdxl_concept_folder_rotation_0_scale_0_is_the_untouched_token(concept, tmp_path):
    cli_main(["sweep", str(concept), "--rotations", "0,0.4", "--scales", "0", "--prompts", "2", "--seeds", "1",
              "--chunk", "1", "--out", str(tmp_path / "sweep"), *GRID])
    items = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["items"]
    assert set(items) == {"untouched token", "rotation 0, scale 0", "rotation 0.4, scale 0"}
    for metric in ("clip_i", "clip_t_full", "dino_i"):  # Eq. 1 per encoder at 0, 0: the same images, the same scores
        assert items["rotation 0, scale 0"][metric] == items["untouched token"][metric]
    assert items["rotation 0.4, scale 0"]["clip_i"] != items["untouched token"]["clip_i"]


def test_persviz_finexl_explain_on_an_sdxl_concept_folders_lora(concept, tmp_path):
    cli_main(["finexl", "explain", "--lora", str(concept), "--out", str(tmp_path / "explain"), "--prompts", "2",
              "--seeds", "1", "--chunk", "1", *GRID])
    explain = json.loads((tmp_path / "explain" / "explain.json").read_text())
    assert explain and (tmp_path / "explain" / "manifest.json").is_file()


def test_a_snapshot_of_an_sdxl_run_generates_as_diffusers_loads_its_file_per_encoder(sdxl, concept):
    """The studies' V* (concept_study.snapshots: {encoder name: row}) inside learned_embedding gives the image of
    diffusers' load_textual_inversion of the snapshot file, each part into its own encoder; undone exactly."""
    from persviz.tea.concept_study import snapshots
    from persviz.tea.study import learned_embedding
    snaps = dict(snapshots(concept / "textual_inversion", 1, None))
    assert sorted(snaps) == [1, 2] and sorted(snaps[2]) == ["clip_g", "clip_l"]
    prompt = "a photo of a <d> on the grass"

    def image():
        return sdxl(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    plain = image()
    with learned_embedding(sdxl, "<d>", snaps[2]):
        ours = image()
    parts = safetensors.torch.load_file(str(concept / "textual_inversion" / "learned_embeds-steps-2.safetensors"))
    sdxl.load_textual_inversion(parts["clip_l"], token="<d>", text_encoder=sdxl.text_encoder, tokenizer=sdxl.tokenizer)
    sdxl.load_textual_inversion(parts["clip_g"], token="<d>", text_encoder=sdxl.text_encoder_2,
                                tokenizer=sdxl.tokenizer_2)
    try:
        theirs = image()
    finally:
        for te, tok in ((sdxl.text_encoder, sdxl.tokenizer), (sdxl.text_encoder_2, sdxl.tokenizer_2)):
            sdxl.unload_textual_inversion("<d>", tokenizer=tok, text_encoder=te)
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, plain)
    np.testing.assert_array_equal(image(), plain)
    with pytest.raises(ValueError, match="the model has 2 text encoders \\(clip_l, clip_g\\): pass the embedding of "
                       "'<d>' as one row per encoder"):
        with learned_embedding(sdxl, "<d>", snaps[2]["clip_l"]):
            pass

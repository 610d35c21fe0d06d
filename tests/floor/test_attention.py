"""persviz.attention on the tiny random pipeline: hand-worked maps under equal keys, identical images with and
without the collector (default processor, peft LoRA, Custom Diffusion), the recomputed probabilities reproduce each
processor's output, processors restored, the memory bound, the aggregate against the stored maps, and the errors."""
import types

import pytest
import torch
from peft import LoraConfig
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0
from safetensors.torch import save_file

from persviz.attention import attention_maps, cross_attention_layers, probabilities, word_positions
from persviz.trainers import load_custom_diffusion

from tests.helpers import random_vector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a red square on grass"


def generate(pipe, steps=2, prompt=PROMPT, seed=0, **kw):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kw).images


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def with_lora(pipe):
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return pipe


def with_custom_diffusion(pipe, folder, q_out=False, sdpa=False):
    """Random learned K/V (and Q/out with q_out) in every cross-attention layer, saved as a run's weights file and
    loaded by persviz (CustomDiffusionAttnProcessor); sdpa: then swapped for CustomDiffusionAttnProcessor2_0."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for name, attn in cross_attention_layers(pipe.unet).items():
        for kv in ("to_k", "to_v") + (("to_q", "to_out.0") if q_out else ()):
            w = (attn.to_out[0] if kv == "to_out.0" else getattr(attn, kv)).weight
            key = "to_out_custom_diffusion.0" if kv == "to_out.0" else f"{kv}_custom_diffusion"
            sd[f"{name}.processor.{key}.weight"] = torch.randn(w.shape, generator=g) * 0.3
            if kv == "to_out.0":
                sd[f"{name}.processor.{key}.bias"] = torch.zeros(w.shape[0])
    save_file(sd, str(folder / "pytorch_custom_diffusion_weights.safetensors"))
    load_custom_diffusion(pipe, folder)
    if sdpa:
        procs = dict(pipe.unet.attn_processors)
        for name, p in procs.items():
            if type(p) is CustomDiffusionAttnProcessor:
                new = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=q_out, hidden_size=p.hidden_size,
                                                      cross_attention_dim=p.cross_attention_dim)
                new.load_state_dict(p.state_dict())
                procs[name] = new
        pipe.unet.set_attn_processor(procs)
    return pipe


SETUPS = {"default": lambda p, d: p, "lora": lambda p, d: with_lora(p),
          "custom_diffusion": lambda p, d: with_custom_diffusion(p, d),
          "custom_diffusion_q_out": lambda p, d: with_custom_diffusion(p, d, q_out=True),
          "custom_diffusion_2_0": lambda p, d: with_custom_diffusion(p, d, sdpa=True)}


def test_equal_keys_give_the_hand_worked_uniform_maps(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    for attn in cross_attention_layers(pipe.unet).values():
        torch.nn.init.zeros_(attn.to_k.weight)  # every key 0: softmax is 1/77 at every pixel, head, layer, step
    n = len(pipe.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    with attention_maps(pipe, words=["square", "grass"]) as m:
        generate(pipe)
    k = {w: len(p) for w, p in m.positions[0].items()}
    assert k["square"] == 1 and k["grass"] >= 1
    for w in ("square", "grass"):
        torch.testing.assert_close(m.maps[w], torch.full((1, 8, 8), k[w] / 77))
        torch.testing.assert_close(m.shares[w], torch.tensor([k[w] / n]))
    torch.testing.assert_close(m.special["start"], torch.tensor([1 / 77]))
    torch.testing.assert_close(m.special["end"], torch.tensor([1 / 77]))
    torch.testing.assert_close(m.special["padding"], torch.tensor([(77 - 2 - n) / 77]))
    torch.testing.assert_close(m.words_share, torch.tensor([n / 77]))
    assert (m.resolution, m.n_layers, m.n_steps) == ((8, 8), 4, 2)


@pytest.mark.parametrize("kind", list(SETUPS))
def test_images_are_identical_and_processors_restored(tiny_sd_pipeline, tmp_path, kind):
    pipe = SETUPS[kind](tiny_sd_pipeline, tmp_path)
    before = processors(pipe)
    keys = set(pipe.unet.state_dict())
    plain = generate(pipe)
    with attention_maps(pipe, words=["square"]) as m:
        assert keys == set(pipe.unet.state_dict())  # Custom Diffusion's weights stay registered
        inside = generate(pipe)
    assert abs(plain - inside).max() == 0
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    if kind.startswith("custom_diffusion"):
        names = {type(p).__name__ for p in after.values()}
        assert ("CustomDiffusionAttnProcessor2_0" if kind.endswith("2_0") else "CustomDiffusionAttnProcessor") in names
    assert m.maps["square"].shape == (1, 8, 8) and float(m.maps["square"].sum()) > 0


@pytest.mark.parametrize("kind", list(SETUPS))
def test_recomputed_probabilities_reproduce_the_processors_output(tiny_sd_pipeline, tmp_path, kind):
    """softmax(QKᵀ·scale) from the processor's own projections, times its own V, gives its output."""
    pipe = SETUPS[kind](tiny_sd_pipeline, tmp_path)
    attn = next(iter(cross_attention_layers(pipe.unet).values()))
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    enc = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    with torch.no_grad():
        out = attn(hs, encoder_hidden_states=enc)
        proc = attn.processor
        p = probabilities(proc, attn, hs, enc)
        v = proc.to_v_custom_diffusion(enc) if kind.startswith("custom_diffusion") else attn.to_v(enc)
        v = v.view(2, 77, attn.heads, -1).transpose(1, 2)
        out_proj = proc.to_out_custom_diffusion[0] if kind == "custom_diffusion_q_out" else attn.to_out[0]
        ref = out_proj((p @ v).transpose(1, 2).reshape(2, 16, -1))
    assert p.shape == (2, attn.heads, 16, 77)
    torch.testing.assert_close(ref, out, atol=1e-5, rtol=1e-4)


def test_processors_restored_after_an_exception(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    before = processors(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with attention_maps(pipe, words=["square"]):
            assert any(type(p).__name__ == "_Wrapped" for p in pipe.unet.attn_processors.values())
            raise RuntimeError("boom")
    after = processors(pipe)
    assert all(after[k] is before[k] for k in before)
    assert "encode_prompt" not in vars(pipe)


def test_memory_is_bounded_independently_of_steps(tiny_sd_pipeline_shared):
    pipe = tiny_sd_pipeline_shared
    sizes = {}
    for steps in (2, 8):
        with attention_maps(pipe, words=["square"]) as m:
            generate(pipe, steps=steps)
        assert m.n_steps == steps
        sizes[steps] = m.stored_elements()
    assert sizes[2] == sizes[8] == 1 * 77 * (8 * 8 + sum(h * w for h, w in m.resolution_maps))


def test_aggregate_equals_the_mean_of_the_stored_maps(tiny_sd_pipeline_shared):
    pipe = tiny_sd_pipeline_shared
    with attention_maps(pipe, words=["square"], keep="all") as all_maps:
        generate(pipe, steps=3)
    with attention_maps(pipe, words=["square"]) as agg:
        generate(pipe, steps=3)
    assert len(all_maps.stored) == all_maps.n_layers * all_maps.n_steps == 4 * 3
    torch.testing.assert_close(all_maps.aggregate_of_stored(), agg.token_maps[0])
    torch.testing.assert_close(all_maps.token_maps, agg.token_maps)
    one = all_maps.layer_map("square", layer=1, step=2)
    h, w = all_maps.layer_resolutions[1]
    assert one.shape == (h, w)
    with pytest.raises(IndexError, match="layer 4 out of range: 4 cross-attention layers"):
        all_maps.layer_map("square", layer=4, step=0)
    with pytest.raises(IndexError, match="step 3 out of range: 3 sampler steps"):
        all_maps.layer_map("square", layer=0, step=3)
    with pytest.raises(ValueError, match='keep="all"'):
        agg.layer_map("square", 0, 0)
    # the widget's views: aggregate, one step over the layers, one layer over the steps, one (layer, step)
    torch.testing.assert_close(all_maps.view("square"), agg.maps["square"][0])
    torch.testing.assert_close(all_maps.view("square", layer=1, step=2), one)
    torch.testing.assert_close(all_maps.view("square", layer=1),
                               sum(all_maps.layer_map("square", 1, t) for t in range(3)) / 3)
    per_layer = [torch.nn.functional.interpolate(all_maps.layer_map("square", i, 2)[None, None], size=(8, 8),
                                                 mode="bilinear", align_corners=False)[0, 0] for i in range(4)]
    torch.testing.assert_close(all_maps.view("square", step=2), sum(per_layer) / 4)
    # the mean over the steps of the one-step views is the aggregate (every layer is seen at every step)
    torch.testing.assert_close(sum(all_maps.view("square", step=t) for t in range(3)) / 3, agg.maps["square"][0])
    with pytest.raises(IndexError, match="step 5 out of range"):
        all_maps.view("square", step=5)
    with pytest.raises(ValueError, match='keep="all"'):
        agg.view("square", layer=0)
    with pytest.raises(KeyError, match="was not collected"):
        all_maps.view("grass")


def test_one_map_per_image_from_the_conditional_half(tiny_sd_pipeline_shared):
    """Two images with guidance: image 0's maps equal those of a one-image run on the same latents."""
    pipe = tiny_sd_pipeline_shared
    prompts = ["a red square", "a blue square on grass"]
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with attention_maps(pipe, words=["square"]) as two:
        pipe(prompts, num_inference_steps=2, generator=gens, output_type="np")
    with attention_maps(pipe, words=["square"]) as one:
        pipe(prompts[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert two.maps["square"].shape == (2, 8, 8) and two.shares["square"].shape == (2,)
    torch.testing.assert_close(two.maps["square"][:1], one.maps["square"], atol=1e-5, rtol=1e-4)
    with attention_maps(pipe, words=["square"]) as off:  # guidance off: the whole batch is conditional
        generate(pipe, guidance_scale=1.0, num_images_per_prompt=2)
    assert off.maps["square"].shape == (2, 8, 8)


def test_multi_vector_placeholder_is_one_word_and_its_rows_are_summed(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pipe.load_textual_inversion({"<v*>": random_vector(1, n=3)})
    assert len(word_positions(pipe, "a <v*> on grass", ["<v*>"])["<v*>"]) == 3
    with attention_maps(pipe, words=["<v*>"], keep="all") as m:
        generate(pipe, prompt="a <v*> on grass")
    pos = m.positions[0]["<v*>"]
    assert pos == [2, 3, 4]
    torch.testing.assert_close(m.maps["<v*>"][0], m.token_maps[0, pos].sum(0))
    torch.testing.assert_close(m.layer_map("<v*>", 0, 0), m.stored[(0, 0)][pos].sum(0))


def test_prompt_embeds_need_the_prompt(tiny_sd_pipeline_shared):
    pipe = tiny_sd_pipeline_shared
    emb, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=2, output_type="np",
              generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="pass attention_maps"):
        with attention_maps(pipe, words=["square"]):
            pipe(**kw)
    with attention_maps(pipe, words=["square"], prompt=PROMPT) as m:
        pipe(**{**kw, "generator": torch.Generator().manual_seed(0)})
    with attention_maps(pipe, words=["square"]) as ref:
        generate(pipe)
    torch.testing.assert_close(m.maps["square"], ref.maps["square"])


def test_clear_errors(tiny_sd_pipeline_shared):
    pipe = tiny_sd_pipeline_shared
    with pytest.raises(ValueError, match=r"word 'circle' is not in the prompt .*\['a', 'red', 'square'"):
        with attention_maps(pipe, words=["circle"], prompt=PROMPT):
            pass
    with pytest.raises(ValueError, match="word 'circle' is not in the prompt"):
        with attention_maps(pipe, words=["circle"]):
            generate(pipe)
    with pytest.raises(ValueError, match="no cross-attention processors"):
        with attention_maps(types.SimpleNamespace(unet=torch.nn.Linear(2, 2)), words=["square"]):
            pass
    with pytest.raises(ValueError, match="keep must be"):
        with attention_maps(pipe, words=["square"], keep="some"):
            pass
    assert all(type(p).__name__ != "_Wrapped" for p in pipe.unet.attn_processors.values())


def test_image_size_and_keep_all_for_one_image_only(tiny_sd_pipeline_shared):
    pipe = tiny_sd_pipeline_shared
    with attention_maps(pipe, words=["square"], size="image") as m:
        generate(pipe)
    assert m.resolution == (8 * pipe.vae_scale_factor,) * 2 and m.maps["square"].shape == (1, *m.resolution)
    before = processors(pipe)
    with pytest.raises(ValueError, match='keep="all" stores the maps of one image; this call generates 2'):
        with attention_maps(pipe, words=["square"], keep="all"):
            generate(pipe, num_images_per_prompt=2)
    assert all(processors(pipe)[k] is before[k] for k in before)

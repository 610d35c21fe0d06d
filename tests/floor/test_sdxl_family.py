"""The SDXL family (persviz.families.sdxl): recognised by its second text encoder, its text stack in diffusers'
order (clip_l then clip_g), its sampler, its generation defaults and its architecture values."""
import copy
from types import SimpleNamespace

import pytest

from persviz.families import FAMILIES, UnsupportedModelError, family_of, training_family
from persviz.families.sdxl import SDXL_BASE, sdxl_component_configs
from persviz.hub_models import HUB_MODELS, SDXL_BASE as HUB_SDXL


def sdxl_like(**more):
    return SimpleNamespace(text_encoder=object(), tokenizer=object(), text_encoder_2=object(), tokenizer_2=object(),
                           **more)


def test_an_sdxl_pipeline_is_of_the_sdxl_family_trains_ti_and_dreambooth_only_and_adopts_nothing_yet():
    from persviz.families import adopting_family
    from persviz.methods import get_method
    pipe = sdxl_like()
    assert family_of(pipe, "my/xl") is FAMILIES["sdxl"]
    assert training_family(pipe, "my/xl", get_method("ti")) is FAMILIES["sdxl"]
    assert training_family(pipe, "my/xl", get_method("dreambooth")) is FAMILIES["sdxl"]
    with pytest.raises(UnsupportedModelError, match="persviz trains textual_inversion and dreambooth on Stable "
                       "Diffusion XL so far, not custom_diffusion; train custom_diffusion on Stable Diffusion 1.x, or "
                       "textual_inversion / dreambooth on my/xl") as info:
        training_family(pipe, "my/xl", get_method("custom_diffusion"))
    assert "\n" not in str(info.value)
    with pytest.raises(UnsupportedModelError, match="my/xl is a Stable Diffusion XL pipeline and persviz adopts runs "
                       "trained on Stable Diffusion 1.x or FLUX.1 only so far") as info:
        adopting_family(pipe, "my/xl")
    assert "\n" not in str(info.value)


def test_sd1_refuses_sdxl_and_sdxl_refuses_one_encoder_pipelines_each_with_a_sentence():
    sd1, sdxl = FAMILIES["sd1"], FAMILIES["sdxl"]
    why = sd1.refusal(sdxl_like(), "my/xl")
    assert "SDXL pipeline" in why and "Stable Diffusion 1.x" in why and "SDXL family takes it" in why
    one = SimpleNamespace(text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=768)), tokenizer=object())
    why = sdxl.refusal(one, "my/sd")
    assert "my/sd" in why and "not an SDXL pipeline" in why and SDXL_BASE in why and "\n" not in why
    assert sd1.refusal(one, "my/sd") is None and family_of(one) is sd1


def test_the_text_stack_is_clip_l_then_clip_g_of_the_pipelines_own_parts():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def encoder(cls, width):
        return cls(CLIPTextConfig(vocab_size=50, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=8, projection_dim=width))
    pipe = sdxl_like()
    pipe.text_encoder, pipe.text_encoder_2 = encoder(CLIPTextModel, 32), encoder(CLIPTextModelWithProjection, 48)
    stack = FAMILIES["sdxl"].text_stack(pipe)
    assert [e.name for e in stack] == ["clip_l", "clip_g"] and [e.width for e in stack] == [32, 48]
    assert stack.primary.encoder is pipe.text_encoder and stack.primary.tokenizer is pipe.tokenizer
    assert stack.by_name("clip_g").encoder is pipe.text_encoder_2 and stack.by_name("clip_g").tokenizer is pipe.tokenizer_2
    assert torch.equal(stack.by_name("clip_g").rows, pipe.text_encoder_2.get_input_embeddings().weight)


def test_prepare_sets_the_sampler_of_diffusers_sdxl_examples_and_vae_slicing():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from persviz.families.sdxl import SCHEDULER
    euler = EulerDiscreteScheduler.from_config(SCHEDULER)
    pipe = SimpleNamespace(scheduler=euler, vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32))
    out = FAMILIES["sdxl"].prepare(pipe, embedded=False)
    assert out is pipe and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_generation_defaults_and_hub_id():
    sdxl = FAMILIES["sdxl"]
    assert sdxl.hub_ids == (SDXL_BASE,) == (HUB_SDXL,) and HUB_SDXL in HUB_MODELS
    assert sdxl.generation_defaults(embedded=False) == {"steps": 25, "guidance": 5.0, "batch_size": 4}


def test_the_architecture_and_its_reduced_width():
    full, small = sdxl_component_configs(), sdxl_component_configs(small=True)
    # SDXL base: cross-attention = 768 + 1280, the added embedding = 6 time ids x 256 + clip_g's pooled 1280
    assert full["unet"]["cross_attention_dim"] == full["text_encoder"]["hidden_size"] + full["text_encoder_2"]["hidden_size"] == 2048
    assert full["unet"]["projection_class_embeddings_input_dim"] == 6 * 256 + 1280 == 2816
    assert full["text_encoder_2"]["projection_dim"] == 1280 and full["vae"]["scaling_factor"] == 0.13025
    assert (small["text_encoder"]["hidden_size"], small["text_encoder_2"]["hidden_size"]) == (32, 48)
    assert small["unet"]["cross_attention_dim"] == 80
    assert small["unet"]["projection_class_embeddings_input_dim"] == 6 * small["unet"]["addition_time_embed_dim"] + 48
    for key in ("down_block_types", "up_block_types", "transformer_layers_per_block", "layers_per_block",
                "addition_embed_type", "use_linear_projection"):
        assert small["unet"][key] == full["unet"][key], key
    for name in ("text_encoder", "text_encoder_2"):
        for key in ("num_hidden_layers", "vocab_size", "max_position_embeddings", "hidden_act"):
            assert small[name][key] == full[name][key], (name, key)
    assert copy.deepcopy(full) == sdxl_component_configs()  # the module's dicts are left as they were

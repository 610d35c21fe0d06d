"""SDXL LoRA files of other tools adopted and loaded (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48).

The files are written by the tools' own code: diffusers' layout by ``StableDiffusionXLPipeline.save_lora_weights``
(``unet.``, ``text_encoder.``, ``text_encoder_2.``, what train_dreambooth_lora_sdxl.py saves) of peft adapters on
both text encoders and the UNet; kohya's layout (``lora_unet_``, ``lora_te1_``, ``lora_te2_``, ``.alpha``) from that
same peft adapters by diffusers' own ``convert_state_dict_to_kohya`` (what diffusers'
train_dreambooth_lora_sdxl_advanced.py uses for its ``--output_kohya_format`` file: kohya's key scheme with the UNet
in diffusers' block names; kohya's own SDXL UNet names, ``lora_unet_input_blocks_*``, are not written here).
The reference is diffusers' ``load_lora_weights`` of the diffusers file."""
import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.helpers import photo_folder
from persviz.concept_folder import ConceptFolderError
from persviz.families import FAMILIES, adopting_family, assemble_pipeline
from persviz.foreign_runs import adopt_run, detect_run
from persviz.hub_models import SDXL_BASE
from persviz.loading import SD15
from persviz.methods import get_method
from persviz.trainers.dreambooth_lora import has_lora, load_dreambooth_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DB = get_method("dreambooth")
UNET_T, TEXT_T = ["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_DIRS = json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 2}})  # kohya's ss_dataset_dirs metadata


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


def peft_lora(module, targets, seed):
    """The peft state dict (get_peft_model_state_dict) of LoRA adapters with random A and B on a copy of `module`."""
    from peft import LoraConfig, get_peft_model_state_dict
    m = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return get_peft_model_state_dict(m)


@pytest.fixture(scope="module")
def lora_files(sdxl, tmp_path_factory):
    """{'diffusers': folder, 'kohya': file, 'swapped': folder}: an SDXL LoRA on the UNet and both text encoders in
    each tool's layout; 'swapped' holds clip_l's adapters under text_encoder_2 (a mix-up of the encoders)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    root = tmp_path_factory.mktemp("sdxl_loras")
    peft = {"unet": peft_lora(sdxl.unet, UNET_T, 1), "text_encoder": peft_lora(sdxl.text_encoder, TEXT_T, 2),
            "text_encoder_2": peft_lora(sdxl.text_encoder_2, TEXT_T, 3)}
    u, t1, t2 = (convert_state_dict_to_diffusers(peft[k]) for k in ("unet", "text_encoder", "text_encoder_2"))
    StableDiffusionXLPipeline.save_lora_weights(str(root / "diffusers"), unet_lora_layers=u,
                                                text_encoder_lora_layers=t1, text_encoder_2_lora_layers=t2)
    StableDiffusionXLPipeline.save_lora_weights(str(root / "swapped"), unet_lora_layers=u,
                                                text_encoder_lora_layers=t1,
                                                text_encoder_2_lora_layers={k: v.clone() for k, v in t1.items()})
    # diffusers' peft -> kohya conversion of the same adapters (the advanced script's --output_kohya_format)
    kohya = convert_state_dict_to_kohya({f"{m}.{k}": v for m, sd in peft.items() for k, v in sd.items()})
    (root / "kohya").mkdir()
    safetensors.torch.save_file(kohya, str(root / "kohya" / "my_sdxl_dog.safetensors"),
                                metadata={"ss_dataset_dirs": KOHYA_DIRS})
    return {"diffusers": root / "diffusers", "kohya": root / "kohya" / "my_sdxl_dog.safetensors",
            "swapped": root / "swapped"}


def images(pipe):
    return pipe("a photo of a sks dog", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_the_files_hold_each_tools_keys(lora_files):
    d = safetensors.torch.load_file(str(lora_files["diffusers"] / "pytorch_lora_weights.safetensors"))
    k = safetensors.torch.load_file(str(lora_files["kohya"]))
    assert {x.split(".")[0] for x in d} == {"unet", "text_encoder", "text_encoder_2"}
    assert {x.split("_")[1] for x in k} == {"unet", "te1", "te2"} and any(x.endswith(".alpha") for x in k)
    assert any(x.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down") for x in k)


def test_diffusers_and_kohya_sdxl_loras_are_adopted_and_load_as_diffusers_loads_them(sdxl, lora_files, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    plain = images(sdxl)
    sdxl.load_lora_weights(str(lora_files["diffusers"]))  # the reference: diffusers' own loader
    try:
        reference = images(sdxl)
    finally:
        sdxl.unload_lora_weights()
    assert not np.array_equal(reference, plain)
    for tool, run in (("diffusers", lora_files["diffusers"]), ("kohya", lora_files["kohya"])):
        found = detect_run("dreambooth", run)
        assert (found.source, found.token, found.class_word) == (
            (tool, "sks", None) if tool == "diffusers" else (tool, "sks", "dog"))
        concept = adopt_run("dreambooth", run, tmp_path / tool, photos, class_word="dog", model=SDXL_BASE, pipe=sdxl)
        assert concept.runs["dreambooth"]["source"] == tool and concept.model == SDXL_BASE
        with DB.loaded(sdxl, run):
            assert has_lora(sdxl.unet) and has_lora(sdxl.text_encoder) and has_lora(sdxl.text_encoder_2)
            tuned = images(sdxl)
        if tool == "diffusers":
            np.testing.assert_array_equal(tuned, reference)
        else:  # kohya's alpha = rank: scale 1, the same weights through diffusers' conversion
            np.testing.assert_allclose(tuned, reference, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(images(sdxl), plain)  # undone exactly
        assert not has_lora(sdxl.text_encoder_2)


def test_an_sd1_lora_on_sdxl_and_an_sdxl_lora_on_sd1_name_both_families(sdxl, lora_files, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    sd1 = assemble_pipeline(SD15, device="cpu")
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "sd1"), unet_lora_layers=convert_state_dict_to_diffusers(peft_lora(sd1.unet, UNET_T, 4)),
                                              text_encoder_lora_layers=convert_state_dict_to_diffusers(
                                                  peft_lora(sd1.text_encoder, TEXT_T, 5)))
    photos = photo_folder(tmp_path / "photos")
    cases = ((tmp_path / "sd1", sdxl, SDXL_BASE, "Stable Diffusion 1.x", "Stable Diffusion XL", "down_blocks_0_attentions"),
             (lora_files["kohya"], sd1, SD15, "Stable Diffusion XL", "Stable Diffusion 1.x", "lora_te1"),
             (lora_files["diffusers"], sd1, SD15, "Stable Diffusion XL", "Stable Diffusion 1.x", "text_encoder_2"))
    for run, pipe, model, file_family, model_family, mark in cases:
        sentence = (f"is a {file_family} LoRA \\(its keys hold {mark}\\) but {model} is a {model_family} pipeline: "
                    f"the LoRA was trained on another model family; pass a {model_family} LoRA, or the {file_family} "
                    "model it was trained on with --model")
        out = tmp_path / f"out_{model_family[-3:].strip()}_{mark}"
        with pytest.raises(ConceptFolderError, match=sentence) as info:
            adopt_run("dreambooth", run, out, photos, class_word="dog", model=model, pipe=pipe)
        assert "\n" not in str(info.value) and not out.exists()
        with pytest.raises(ValueError, match=sentence):
            load_dreambooth_lora(pipe, run)
        assert not has_lora(pipe.unet)


def test_each_encoders_lora_is_checked_against_its_own_width(sdxl, lora_files, tmp_path):
    with pytest.raises(ConceptFolderError, match="the clip_g text encoder's LoRA in pytorch_lora_weights.safetensors "
                       "is 32 wide but the model's is 48: the run was trained on another model") as info:
        adopt_run("dreambooth", lora_files["swapped"], tmp_path / "c", photo_folder(tmp_path / "photos"),
                  class_word="dog", model=SDXL_BASE, pipe=sdxl)
    assert "\n" not in str(info.value) and not (tmp_path / "c").exists()


def test_sdxl_adopts_lora_runs_only_and_other_methods_get_a_sentence(sdxl):
    assert adopting_family(sdxl, SDXL_BASE, DB) is FAMILIES["sdxl"]
    for name in ("textual_inversion", "custom_diffusion"):
        with pytest.raises(ValueError, match=f"persviz adopts dreambooth runs on Stable Diffusion XL so far, not "
                           f"{name}; adopt a {name} run trained on Stable Diffusion 1.x, or train {name} with persviz "
                           "train where it trains") as info:
            adopting_family(sdxl, SDXL_BASE, get_method(name))
        assert "\n" not in str(info.value)

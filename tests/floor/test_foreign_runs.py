"""Run folders of other tools read as they are (persviz.foreign_runs, the trainers' loaders, the tracker), and
adopt_run's checks with nothing written. Each fixture is written by the tool's own save code where it runs here,
else from the tool's documented keys; the source is named in each fixture's docstring."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from persviz.concept_folder import ConceptFolderError, read_concept
from persviz.foreign_runs import adopt_run, detect_run
from persviz.tea.study import personalized
from persviz.tea.tracker import track_semantic_shift
from persviz.trainers import list_snapshots, load_snapshot_embedding
from persviz.embedding_files import read_embedding_file
from tests.helpers import D, random_vector
from tests.tool_formats import a1111_image_embedding, kohya_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a {} on a beach", "a {} in the snow", "a photo of a {}"]


def image(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                guidance_scale=1.0).images[0]


# ----------------------------------------------------------------------------- fixtures


def diffusers_ti_run(folder, token="<cat-toy>", steps=(1, 2, 3), width=D):
    """diffusers examples/textual_inversion/textual_inversion.py, save_progress: {placeholder: weight[ids] [1, D]}
    saved with safetensors.torch.save_file(..., metadata={"format": "pt"}) as learned_embeds-steps-N.safetensors,
    and learned_embeds.safetensors at the end; no config.json."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for k in steps:
        rows = torch.randn(1, width, generator=g) * (1 + k)
        safetensors.torch.save_file({token: rows}, str(folder / f"learned_embeds-steps-{k}.safetensors"),
                                    metadata={"format": "pt"})
    safetensors.torch.save_file({token: rows}, str(folder / "learned_embeds.safetensors"), metadata={"format": "pt"})
    return folder


def a1111_ti_run(log_dir, name="cattoy", steps=(5, 10)):
    """Automatic1111 modules/textual_inversion: Embedding.save writes {"string_to_token": {"*": 265},
    "string_to_param": {"*": vec [n, D]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"} with torch.save;
    train_embedding saves textual_inversion/<date>/<name>/embeddings/<name>-<step>.pt (named "<name>-<step>")."""
    emb = log_dir / "embeddings"
    emb.mkdir(parents=True)
    for k in steps:
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": random_vector(k, 1)},
                    "name": f"{name}-{k}", "step": k - 1, "sd_checkpoint": "abc123", "sd_checkpoint_name": "tiny"},
                   emb / f"{name}-{k}.pt")
    return log_dir


def lora_run(pipe, folder, rank=2):
    """diffusers examples/dreambooth/train_dreambooth_lora.py: unet.add_adapter(LoraConfig(r, lora_alpha=r,
    init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0, ...])), the text encoder's on q/k/v/
    out_proj, then StableDiffusionLoraLoaderMixin.save_lora_weights(output_dir, unet_lora_layers=
    convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), text_encoder_lora_layers=...). The B
    matrices (zero at init) get random values, as training would give."""
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    te.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in (unet, te):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)),
        safe_serialization=True)
    return folder


def kohya_from_diffusers(diffusers_file, out_file, rank=2, dataset_dir="10_zwx toy"):
    """kohya's sd-scripts networks/lora.py naming (as A1111 reads it): lora_unet_<module path with _>.lora_down.weight
    / .lora_up.weight / .alpha, lora_te_<text model path>; metadata ss_dataset_dirs {"<repeats>_<token> <class>"}.
    Built from the diffusers file's keys (A -> lora_down, B -> lora_up, alpha = rank: the same LoRA)."""
    sd = safetensors.torch.load_file(str(diffusers_file))
    out = {}
    ends = {".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
            ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up"}
    for k, v in sd.items():
        model, rest = k.split(".", 1)
        end = next(e for e in ends if rest.endswith(e))
        module = rest[:-len(end)]
        if model == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = ("lora_unet_" if model == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{ends[end]}.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(out, str(out_file), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
        "ss_dataset_dirs": json.dumps({dataset_dir: {"n_repeats": 10, "img_count": 4}})})
    return out_file


def custom_diffusion_run(pipe, folder, token="<new1>", safe=True, embed=True):
    """diffusers examples/custom_diffusion/train_custom_diffusion.py (--freeze_model crossattn_kv): the
    CustomDiffusionAttnProcessor set-up of the script (attn2: train_kv, K/V from the base projections; attn1: no
    weights), then unet.save_attn_procs(output_dir, safe_serialization=safe) (the weights file, .safetensors or .bin)
    and save_new_embed: safetensors.torch.save_file({token: row [D]}, f"{output_dir}/{token}.bin", metadata=
    {"format": "pt"}). The K/V weights get a random change, as training would give."""
    unet = copy.deepcopy(pipe.unet)
    st = unet.state_dict()
    procs = {}
    g = torch.Generator().manual_seed(5)
    for name in unet.attn_processors:
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layer = name.split(".processor")[0]
        if cross is not None:
            procs[name] = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=hidden,
                                                       cross_attention_dim=cross)
            w = {"to_k_custom_diffusion.weight": st[layer + ".to_k.weight"],
                 "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"]}
            procs[name].load_state_dict({k: v + torch.randn(v.shape, generator=g) for k, v in w.items()})
        else:
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False, hidden_size=hidden,
                                                       cross_attention_dim=None)
    unet.set_attn_processor(procs)
    unet.save_attn_procs(str(folder), safe_serialization=safe)
    if embed:
        safetensors.torch.save_file({token: random_vector(7)}, str(folder / f"{token}.bin"), metadata={"format": "pt"})
    return folder


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"p{i}.png")
    return folder


# ----------------------------------------------------------------------------- Textual Inversion


def test_the_diffusers_example_run_is_tracked_and_loaded(tmp_path, tiny_sd_pipeline):
    run = diffusers_ti_run(tmp_path / "ti")
    assert [k for k, _ in list_snapshots(run)] == [1, 2, 3]
    found = detect_run("ti", run)
    assert (found.source, found.token) == ("diffusers", "<cat-toy>")
    track = track_semantic_shift(tiny_sd_pipeline, run, PROMPTS, class_word="square", placeholder="<cat-toy>",
                                 progress=False)
    assert track["step"] == [1, 2, 3] and len(set(track["vstar_norm"])) == 3
    base = image(tiny_sd_pipeline, "a <cat-toy>")
    with personalized(tiny_sd_pipeline, "textual_inversion", run):
        assert "<cat-toy>" in tiny_sd_pipeline.tokenizer.get_added_vocab()
        mine = image(tiny_sd_pipeline, "a <cat-toy>")
    assert "<cat-toy>" not in tiny_sd_pipeline.tokenizer.get_added_vocab()
    assert not np.allclose(mine, base)
    tiny_sd_pipeline.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    np.testing.assert_allclose(mine, image(tiny_sd_pipeline, "a <cat-toy>"), atol=1e-6)


def test_an_a1111_run_folder_is_tracked_and_loaded(tmp_path, tiny_sd_pipeline):
    run = a1111_ti_run(tmp_path / "textual_inversion" / "2026-01-01" / "cattoy")
    assert [k for k, _ in list_snapshots(run)] == [5, 10]
    torch.testing.assert_close(load_snapshot_embedding(run / "embeddings" / "cattoy-10.pt"), random_vector(10))
    found = detect_run("textual_inversion", run)
    assert (found.source, found.token) == ("a1111", "cattoy")
    track = track_semantic_shift(tiny_sd_pipeline, run, PROMPTS, class_word="square", placeholder="cattoy",
                                 progress=False)
    assert track["step"] == [5, 10]
    with personalized(tiny_sd_pipeline, "textual_inversion", run):
        ids = tiny_sd_pipeline.tokenizer.convert_tokens_to_ids(["cattoy"])
        row = tiny_sd_pipeline.text_encoder.get_input_embeddings().weight[ids[0]]
        torch.testing.assert_close(row.detach(), random_vector(10))  # the last snapshot: A1111's final
    assert "cattoy" not in tiny_sd_pipeline.tokenizer.get_added_vocab()


# ----------------------------------------------------------------------------- DreamBooth-LoRA


def test_diffusers_and_kohya_loras_load_alike(tmp_path, tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    run = lora_run(pipe, tmp_path / "db")
    kohya = tmp_path / "kohya"
    kohya.mkdir()
    kohya_from_diffusers(run / "pytorch_lora_weights.safetensors", kohya / "zwx_toy-000010.safetensors")
    assert detect_run("dreambooth", run).source == "diffusers"
    found = detect_run("dreambooth", kohya)
    assert (found.source, found.token, found.class_word) == ("kohya", "zwx", "toy")
    base = image(pipe, "a photo of sks toy")
    with personalized(pipe, "dreambooth", run):
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())
        by_diffusers = image(pipe, "a photo of sks toy")
    with personalized(pipe, "dreambooth", kohya):
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())
        assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())
        by_kohya = image(pipe, "a photo of sks toy")
    assert not np.allclose(by_diffusers, base)
    np.testing.assert_allclose(by_kohya, by_diffusers, atol=1e-5)
    np.testing.assert_allclose(image(pipe, "a photo of sks toy"), base, atol=1e-6)


# ----------------------------------------------------------------------------- Custom Diffusion


@pytest.mark.parametrize("safe", [True, False])
def test_the_custom_diffusion_example_run_loads(tmp_path, tiny_sd_pipeline, safe):
    pipe = tiny_sd_pipeline
    run = custom_diffusion_run(pipe, tmp_path / "cd", safe=safe)
    name = "pytorch_custom_diffusion_weights." + ("safetensors" if safe else "bin")
    assert (run / name).is_file() and (run / "<new1>.bin").is_file()
    found = detect_run("custom-diffusion", run)
    assert (found.source, found.token) == ("diffusers", "<new1>")
    base = image(pipe, "a <new1> square")
    saved = safetensors.torch.load_file(str(run / name)) if safe else torch.load(run / name, weights_only=True)
    with personalized(pipe, "custom_diffusion", run):
        procs = pipe.unet.attn_processors
        key = next(k for k in saved if k.endswith("to_k_custom_diffusion.weight"))
        proc = procs[key.split(".processor.")[0] + ".processor"]
        assert isinstance(proc, CustomDiffusionAttnProcessor)
        torch.testing.assert_close(proc.to_k_custom_diffusion.weight.detach(), saved[key])
        assert "<new1>" in pipe.tokenizer.get_added_vocab()
        mine = image(pipe, "a <new1> square")
    assert not np.allclose(mine, base)
    assert "<new1>" not in pipe.tokenizer.get_added_vocab()


# ----------------------------------------------------------------------------- adopt_run


def test_adopt_records_the_run_where_it_is(tmp_path, tiny_sd_pipeline, photos):
    run = custom_diffusion_run(tiny_sd_pipeline, tmp_path / "cd")
    out = tmp_path / "concept"
    concept = adopt_run("custom_diffusion", run, out, photos, class_word="square", pipe=tiny_sd_pipeline)
    again = read_concept(out)
    assert again.runs["custom_diffusion"] == {"folder": str(run.resolve()), "token": "<new1>", "source": "diffusers"}
    assert again.run_dir("custom_diffusion") == run.resolve() and concept.placeholder == "<new1>"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert sorted(p.name for p in out.iterdir()) == ["concept.json", "images"]  # the run is not copied
    ti = diffusers_ti_run(tmp_path / "ti")
    adopt_run("ti", ti, out, photos, pipe=tiny_sd_pipeline)  # the class word from the concept folder
    assert read_concept(out).token("textual_inversion") == "<cat-toy>"


@pytest.mark.parametrize("case, message", [
    ("unknown", "looked for pytorch_custom_diffusion_weights"),
    ("width", "trained on another model"),
    ("no-token", "pass --token"),
    ("no-class", "pass --class-word"),
    ("lora-width", "trained on another model"),
])
def test_bad_runs_write_nothing(tmp_path, tiny_sd_pipeline, photos, case, message):
    out = tmp_path / "concept"
    method, class_word = "custom_diffusion", "square"
    if case == "unknown":
        run = tmp_path / "junk"
        run.mkdir()
        (run / "weights.bin").write_bytes(b"hello")
    elif case == "width":
        method, run = "ti", diffusers_ti_run(tmp_path / "ti", width=D + 16)
    elif case == "no-token":
        run = custom_diffusion_run(tiny_sd_pipeline, tmp_path / "cd", embed=False)
    elif case == "no-class":
        method, class_word, run = "ti", None, diffusers_ti_run(tmp_path / "ti")
    else:
        method, run = "dreambooth", lora_run(tiny_sd_pipeline, tmp_path / "db")
        f = run / "pytorch_lora_weights.safetensors"
        sd = safetensors.torch.load_file(str(f))
        sd = {k: (torch.zeros(v.shape[0], D + 16) if "attn2.to_k" in k and "down" in k else v) for k, v in sd.items()}
        safetensors.torch.save_file(sd, str(f))
    with pytest.raises(ValueError, match=message):
        adopt_run(method, run, out, photos, class_word=class_word, pipe=tiny_sd_pipeline)
    assert not out.exists()


# ----------------------------------------------------------------------------- issue 21: kohya, A1111 pictures, steps


def test_a_kohya_run_folder_is_adopted_tracked_and_loaded(tmp_path, tiny_sd_pipeline, photos):
    """kohya-ss sd-scripts train_textual_inversion.py --save_every_n_steps 20 (writer: tests/tool_formats.py)."""
    run = kohya_run(tmp_path / "kohya_out", "zwxtoy", [20, 40], lambda k: random_vector(k, 1))
    assert [k for k, _ in list_snapshots(run)] == [20, 40]
    found = detect_run("textual_inversion", run)
    assert (found.source, found.token) == ("kohya", "zwxtoy")
    assert [p.name for p in found.files] == ["zwxtoy-step00000020.safetensors", "zwxtoy-step00000040.safetensors",
                                             "zwxtoy.safetensors"]
    track = track_semantic_shift(tiny_sd_pipeline, run, PROMPTS, class_word="square", placeholder="zwxtoy",
                                 progress=False)
    assert track["step"] == [20, 40]
    concept = adopt_run("ti", run, tmp_path / "concept", photos, class_word="square", pipe=tiny_sd_pipeline)
    assert concept.runs["textual_inversion"]["source"] == "kohya" and concept.placeholder == "zwxtoy"


def test_an_a1111_image_embeddings_folder_is_adopted_with_the_same_steps(tmp_path, tiny_sd_pipeline, photos):
    """A1111's train_embedding with 'save images with embedding': image_embeddings/<name>-<steps_done>.png holding
    step = steps_done - 1; inspect, the tracker and adopt all say steps_done."""
    folder = tmp_path / "textual_inversion" / "2026-01-01" / "candy" / "image_embeddings"
    folder.mkdir(parents=True)
    for k in (10, 20):
        a1111_image_embedding(folder / f"candy-{k}.png", random_vector(k, 1), f"candy-{k}", k - 1,
                              text_chunk=k == 10)  # the second one is read from its pixels
    assert [k for k, _ in list_snapshots(folder)] == [10, 20]
    assert [k for k, _ in list_snapshots(folder.parent)] == [10, 20]  # the run's folder finds its image_embeddings/
    assert read_embedding_file(folder / "candy-20.png").metadata["step"] == 20
    track = track_semantic_shift(tiny_sd_pipeline, folder, PROMPTS, class_word="square", placeholder="candy",
                                 progress=False)
    assert track["step"] == [10, 20]
    found = detect_run("textual_inversion", folder)
    assert (found.source, found.token) == ("a1111", "candy")
    with pytest.raises(ValueError, match=r"write it in prompts as candy, without brackets.*--token 'candy'"):
        detect_run("textual_inversion", folder, token="<candy>")
    adopt_run("ti", folder.parent, tmp_path / "concept", photos, class_word="square", pipe=tiny_sd_pipeline)
    assert read_concept(tmp_path / "concept").token("textual_inversion") == "candy"


def test_an_embeddings_folder_is_not_a_run_and_says_what_it_holds(tmp_path, tiny_sd_pipeline, photos):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    for name in ("candy", "dog"):
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": random_vector(1, 1)}, "name": name,
                    "step": 100}, folder / f"{name}.pt")
    with pytest.raises(ValueError, match=r"holds 2 embedding file\(s\) \(candy.pt, dog.pt\) but no numbered snapshots"):
        adopt_run("ti", folder, tmp_path / "concept", photos, class_word="square", pipe=tiny_sd_pipeline)
    for name in ("candy", "dog"):
        (folder / f"{name}-5.pt").write_bytes((folder / f"{name}.pt").read_bytes())
    with pytest.raises(ValueError, match=r"snapshots of several embeddings \(candy, dog\)"):
        adopt_run("ti", folder, tmp_path / "concept", photos, class_word="square", pipe=tiny_sd_pipeline)
    assert not (tmp_path / "concept").exists()

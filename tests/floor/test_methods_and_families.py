"""persviz.methods and persviz.families: the registries, each method's recipe against the values docs/tea.md §8
states, load-and-undo on the shipped micro-SD (the pipeline back exactly as it was), the one-module promise (a method
defined in this test file works through the library without touching it), the families' refusals and the text
stack against the pipeline's own parts."""
from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from persviz import methods
from persviz.families import FAMILIES, UnsupportedModelError, assemble_pipeline, family_of, text_stack
from persviz.methods import METHODS, REGISTRY, UnknownMethodError, get_method, tracked_method
from persviz.methods.base import Method
from persviz.shapesworld.concepts import CONCEPTS_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]


def test_the_registry_names_and_aliases():
    assert METHODS == ("textual_inversion", "dreambooth", "custom_diffusion")
    assert set(REGISTRY) == {*METHODS, "lora_finetune"}
    for name in ("ti", "textual-inversion", "Textual_Inversion"):
        assert get_method(name).name == "textual_inversion"
    assert get_method("custom-diffusion").name == "custom_diffusion"
    with pytest.raises(UnknownMethodError, match="unknown method 'lora'; choose one of textual_inversion, dreambooth"):
        get_method("lora")
    with pytest.raises(UnknownMethodError):  # not a concept method unless asked for
        get_method("lora_finetune")
    assert get_method("lora_finetune", concept_only=False).name == "lora_finetune"
    assert tracked_method(["dreambooth", "textual_inversion"]).name == "textual_inversion"
    assert tracked_method(["dreambooth"]) is None


def test_listing_the_methods_imports_no_torch():
    code = "import sys, persviz.methods as m; m.get_method('ti'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name,shapesworld,want", [
    # docs/tea.md §8: the paper's settings, and the shipped ShapesWorld runs' documented rates
    ("textual_inversion", False, {"lr": 5e-4, "steps": 3000, "save_every": 100, "batch_size": 1}),
    ("textual_inversion", True, {"lr": 1e-3, "steps": 3000}),
    ("dreambooth", False, {"lr": 1e-4, "rank": 4, "train_text_encoder": True, "prior_loss_weight": 1.0}),
    ("dreambooth", True, {"lr": 1e-3, "save_every": 100, "class_steps": 25, "class_guidance": 4.0}),
    ("custom_diffusion", False, {"lr": 5e-6, "steps": 2000}),
    ("custom_diffusion", True, {"lr": 1e-4, "steps": 1000, "augment": False}),
])
def test_recipes_hold_the_documented_settings(name, shapesworld, want):
    cfg = get_method(name).recipe("<c>" if name != "dreambooth" else "sks", "circle", shapesworld)
    assert {k: getattr(cfg, k) for k in want} == want
    over = get_method(name).recipe("<c>" if name != "dreambooth" else "sks", "circle", shapesworld, steps=7, lr=None)
    assert over.steps == 7 and over.lr == want["lr"]  # None keeps the default
    with pytest.raises(ValueError, match="unknown setting"):
        get_method(name).recipe("<c>", "circle", shapesworld, epochs=3)


def test_slot_words_and_conditions():
    ti, db, cd = (get_method(n) for n in METHODS)
    assert (ti.slot_word("<c>", "circle"), db.slot_word("sks", "circle"), cd.slot_word("<c-cd>", "circle")) == \
        ("<c>", "sks circle", "<c-cd> circle")
    assert (ti.condition(300), db.condition(-1), cd.condition(None)) == ("textual_inversion step 300", "dreambooth",
                                                                         "custom_diffusion")
    assert (ti.tea_level, db.tea_level, cd.tea_level) == ("token", "prompt", "token")
    assert (ti.concept_placeholder("candy"), db.concept_placeholder("sks")) == ("candy", "<sks>")


def _state(pipe):
    """Everything a run could leave behind: the tokenizer's size, the embedding matrix, UNet weights, processors."""
    emb = text_stack(pipe).primary.rows.detach().clone()
    unet = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    procs = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    return (len(pipe.tokenizer), pipe.text_encoder.config.vocab_size), emb, unet, procs


@pytest.mark.parametrize("name", METHODS)
def test_loaded_changes_the_pipeline_inside_and_restores_it_exactly(shapesworld_pipeline, name):
    pipe = shapesworld_pipeline
    run = CONCEPTS_DIR / "candy" / name
    n0, emb0, unet0, procs0 = _state(pipe)
    with get_method(name).loaded(pipe, run):
        n1, emb1, unet1, procs1 = _state(pipe)
        changed = (n1 != n0) or (procs1 != procs0) or any(not torch.equal(unet0[k], unet1[k]) for k in unet0
                                                          if k in unet1) or set(unet1) != set(unet0)
        assert changed, f"loading the {name} run changed nothing"
    n2, emb2, unet2, procs2 = _state(pipe)
    assert n2 == n0 and torch.equal(emb2, emb0) and procs2 == procs0
    assert set(unet2) == set(unet0) and all(torch.equal(unet0[k], unet2[k]) for k in unet0)


@dataclass(frozen=True)
class Marker(Method):
    """A method defined outside the package: loading it writes a marker row; the library reaches it by its name."""

    @contextlib.contextmanager
    def loaded(self, pipe, run):
        rows = text_stack(pipe).primary.rows
        old = rows[0].detach().clone()
        with torch.no_grad():
            rows[0] += 1.0
        try:
            yield
        finally:
            with torch.no_grad():
                rows[0] = old


def test_a_new_method_is_one_object_in_the_registry(shapesworld_pipeline, monkeypatch):
    from persviz.tea.study import personalized
    monkeypatch.setitem(methods.REGISTRY, "marker", Marker("marker", "marker"))
    pipe = shapesworld_pipeline
    before = text_stack(pipe).primary.rows[0].detach().clone()
    with personalized(pipe, "marker", "anywhere"):
        assert torch.equal(text_stack(pipe).primary.rows[0], before + 1.0)
    assert torch.equal(text_stack(pipe).primary.rows[0], before)


def test_the_micro_sd_is_sd1_and_its_text_stack_is_its_own_parts(shapesworld_pipeline):
    pipe = shapesworld_pipeline
    assert family_of(pipe) is FAMILIES["sd1"]
    stack = text_stack(pipe)
    assert [e.name for e in stack] == ["clip_l"] and stack.primary.tokenizer is pipe.tokenizer
    assert stack.primary.encoder is pipe.text_encoder and stack.primary.width == 128
    cid = pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]
    assert torch.equal(stack.primary.word_row("circle"), pipe.text_encoder.get_input_embeddings().weight[cid])
    assert not stack.primary.has_added("<candy>")
    with pytest.raises(KeyError, match="no text encoder 't5'"):
        stack.by_name("t5")


@pytest.mark.parametrize("pipe,match", [
    (SimpleNamespace(text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=1024)), tokenizer=object()),
     "Stable Diffusion 2.x.*supports Stable Diffusion 1.x and SDXL, not 2.x"),
    (SimpleNamespace(unet=object()), "has no CLIP text encoder"),
])
def test_pipelines_of_no_family_are_refused_with_a_sentence(pipe, match):
    # an SDXL pipeline (text_encoder_2, tokenizer_2) is of the SDXL family now: tests/floor/test_sdxl_family.py
    with pytest.raises(UnsupportedModelError, match=match) as info:
        family_of(pipe, "my/model")
    assert "my/model" in str(info.value) and "\n" not in str(info.value)


def test_the_assembler_leaves_the_embedded_model_as_saved_and_prepares_full_scale_for_the_paper(shapesworld_pipeline):
    from diffusers import DPMSolverMultistepScheduler
    pipe = assemble_pipeline("shapesworld")
    saved = dict(pipe.scheduler.config)
    assert dict(assemble_pipeline(None).scheduler.config) == saved and not pipe.vae.use_slicing
    full = FAMILIES["sd1"].prepare(copy.deepcopy(pipe), embedded=False)
    assert isinstance(full.scheduler, DPMSolverMultistepScheduler)
    assert full.scheduler.config.algorithm_type == "dpmsolver++" and full.vae.use_slicing
    assert assemble_pipeline(shapesworld_pipeline) is shapesworld_pipeline  # a loaded pipeline: checked, as it is


def test_a_family_names_its_downloads_and_writes_its_offline_test_cache(tmp_path):
    from persviz.hub_models import download_command
    from persviz.sd15 import offline_commit
    sd1 = FAMILIES["sd1"]
    assert sd1.download_commands() == [download_command("stable-diffusion-v1-5/stable-diffusion-v1-5")]
    assert sd1.download_commands()[0].startswith("hf download stable-diffusion-v1-5/stable-diffusion-v1-5")
    written = sd1.write_test_cache(tmp_path)
    hub = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert hub in written
    ref = tmp_path / ("models--" + hub.replace("/", "--")) / "refs" / "main"
    assert ref.read_text().strip() == offline_commit(hub)

"""persviz.finexl.concept_pair: FineXL's full-scale target (a concept's DreamBooth-LoRA or a named LoRA), its probes,
and the (base, personalized) pair it builds."""
import copy
import shutil

import numpy as np
import pytest

from persviz.concept_folder import Concept, ConceptFolderError, write_concept
from persviz.finexl.concept_pair import (DEFAULT_CLASS_WORD, NEEDS_LORA, N_PROBES, FineXLTarget, FineXLTargetError,
                                         class_probes, concept_lora_pair, full_scale_inputs, lora_target,
                                         session_target)
from persviz.finexl.benchmark import LORA_DIR
from persviz.finexl.concepts import ART_BANK
from persviz.generation import generate
from persviz.prompts import load_prompt_set
from persviz.session import PAPER_GENERATION, Session, read_settings
from persviz.trainers.lora_finetune import LORA_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHIPPED_LORA = LORA_DIR / "mix_large067_red100" / LORA_FILE
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def concept_folder(tmp_path, with_run=True):
    """A concept folder of an SD 1.5 concept whose DreamBooth-LoRA run holds a (shipped ShapesWorld) LoRA file."""
    folder = tmp_path / "my_dog"
    folder.mkdir(parents=True)
    runs = {}
    if with_run:
        (folder / "dreambooth").mkdir()
        shutil.copy(SHIPPED_LORA, folder / "dreambooth" / LORA_FILE)
        runs = {"dreambooth": {"folder": "dreambooth", "token": "sks"}}
    write_concept(Concept("<my-dog>", "dog", MODEL, runs=runs, name="my_dog", folder=folder))
    return folder


def full_session(**env):
    return Session("full", settings=read_settings("full", env))


def test_a_concept_folder_gives_its_dreambooth_lora_and_class_word(tmp_path):
    folder = concept_folder(tmp_path)
    t = lora_target(folder)
    assert t.lora == (folder / "dreambooth" / LORA_FILE).resolve() and t.class_word == "dog"
    assert "sks dog" in t.label and t.concept.placeholder == "<my-dog>"
    assert lora_target(t.concept) == t and lora_target(t) is t          # a Concept or a target works as well
    assert lora_target(folder, class_word="puppy").class_word == "puppy"
    assert lora_target(t, class_word="puppy").lora == t.lora


def test_a_lora_file_or_folder_is_its_own_target():
    for path in (SHIPPED_LORA, SHIPPED_LORA.parent, str(SHIPPED_LORA)):
        t = lora_target(path)
        assert t.lora == SHIPPED_LORA.resolve() and t.class_word == DEFAULT_CLASS_WORD and t.concept is None
    assert lora_target(SHIPPED_LORA, "cat").class_word == "cat"


def test_missing_loras_and_runs_say_what_to_do(tmp_path):
    with pytest.raises(FineXLTargetError, match="does not exist"):
        lora_target(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FineXLTargetError, match=f"no LoRA at .*{LORA_FILE}"):
        lora_target(tmp_path / "empty")
    folder = concept_folder(tmp_path, with_run=False)
    with pytest.raises(ConceptFolderError, match="persviz train dreambooth"):
        lora_target(folder)


def test_session_target_prefers_the_named_lora_and_never_falls_back(tmp_path):
    folder = concept_folder(tmp_path)
    assert session_target(full_session(PERSVIZ_CONCEPT=str(folder))).lora == lora_target(folder).lora
    both = session_target(full_session(PERSVIZ_CONCEPT=str(folder), PERSVIZ_FINEXL_LORA=str(SHIPPED_LORA.parent),
                                       PERSVIZ_FINEXL_CLASS="cat"))
    assert both.lora == SHIPPED_LORA.resolve() and both.class_word == "cat"
    other = concept_folder(tmp_path / "second")
    first = session_target(full_session(PERSVIZ_CONCEPT=f"{folder},{other}", PERSVIZ_FINEXL_CLASS="pup"))
    assert first.lora == lora_target(folder).lora and first.class_word == "pup"
    with pytest.raises(FineXLTargetError) as err:
        session_target(full_session())
    assert str(err.value) == NEEDS_LORA
    assert "persviz train dreambooth" in NEEDS_LORA and "PERSVIZ_FINEXL_LORA" in NEEDS_LORA


def test_class_probes_fill_the_sd15_contextual_prompts():
    probes = class_probes("dog")
    assert len(probes) == N_PROBES == len(set(probes))
    assert probes == [p.replace("{}", "dog") for p in load_prompt_set("sd15_contextual")[:N_PROBES]]
    assert all("dog" in p and "{}" not in p for p in probes)
    assert class_probes("cat", 3) == [p.replace("{}", "cat") for p in load_prompt_set("sd15_contextual")[:3]]
    for bad in (0, 10_000):
        with pytest.raises(ValueError, match="n must be between"):
            class_probes("dog", bad)
    with pytest.raises(ValueError, match="class_word"):
        class_probes("  ")


def test_full_scale_inputs_take_the_paper_settings_unless_overridden(tmp_path):
    folder = concept_folder(tmp_path)
    inputs = full_scale_inputs(full_session(PERSVIZ_CONCEPT=str(folder)))
    assert inputs.generation == PAPER_GENERATION and inputs.bank == tuple(ART_BANK)
    assert len(inputs.probes) == N_PROBES and "sks dog" in str(inputs)
    inputs = full_scale_inputs(full_session(PERSVIZ_CONCEPT=str(folder), PERSVIZ_STEPS="2", PERSVIZ_GUIDANCE="3.5",
                                            PERSVIZ_BATCH_SIZE="4", PERSVIZ_PROBES="5"))
    assert inputs.generation == {"steps": 2, "guidance": 3.5, "batch_size": 4} and len(inputs.probes) == 5


def test_concept_lora_pair_toggles_the_concepts_lora(tmp_path, shapesworld_pipeline):
    """The pair of a concept folder: base = the pipeline without the LoRA, bit for bit; personalized differs."""
    folder = concept_folder(tmp_path)
    pipe = copy.deepcopy(shapesworld_pipeline)
    prompts = ["a large red circle on a black background", "a small blue square on a white background"]
    plain = generate(pipe, prompts, seed=0, steps=2)
    base, personal = concept_lora_pair(pipe, folder, steps=2, batch_size=1)
    assert (base.steps, base.batch_size, base.enabled, personal.enabled) == (2, 1, False, True)
    np.testing.assert_array_equal(base(prompts, 0), plain)
    assert not np.array_equal(personal(prompts, 0), plain)
    assert isinstance(lora_target(folder), FineXLTarget)

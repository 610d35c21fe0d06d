"""persviz.session: the scale, the settings and the threads a notebook opens with (models loaded once, tiny)."""
import pytest
import torch

from persviz import session
from persviz.concept_folder import Concept, ConceptFolderError, write_concept
from persviz.session import (PAPER_GENERATION, SHAPESWORLD_GENERATION, Session, default_threads, paper_sampling,
                             read_settings, resolve_scale, setup)
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR
from tests.helpers import make_tiny_sd_pipeline

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_scale_comes_from_the_argument_or_the_environment():
    assert resolve_scale(env={}) == "shapesworld"
    assert resolve_scale(env={"PERSVIZ_SCALE": " Full "}) == "full"
    assert resolve_scale("shapesworld", env={"PERSVIZ_SCALE": "full"}) == "shapesworld"
    with pytest.raises(ValueError, match="not understood"):
        resolve_scale(env={"PERSVIZ_SCALE": "huge"})


def test_full_scale_settings_are_read_at_full_scale_only():
    env = {"PERSVIZ_CONCEPT": "/c", "PERSVIZ_STEPS": "3", "PERSVIZ_FINEXL_LORA": "", "PERSVIZ_PIGEON_WEIGHTS": "/snap"}
    small = read_settings("shapesworld", env)
    assert small["concept"] == "/c" and small["pigeon_weights"] == "/snap"  # read at either scale
    assert small["steps"] is None and small["finexl_lora"] is None and small["finexl_class"] is None
    full = read_settings("full", env)
    assert full["steps"] == "3" and full["finexl_lora"] is None  # empty counts as unset
    assert "ti_runs" not in full  # PERSVIZ_TI_RUNS gave way to concept folders (PERSVIZ_CONCEPT)
    s = Session("full", settings=full)
    assert s.full and s.setting("steps", "x") == "3" and s.setting("finexl_class", "dog") == "dog"
    with pytest.raises(RuntimeError, match="PERSVIZ_FINEXL_LORA=<a LoRA>"):
        s.require("finexl_lora", "a LoRA")
    with pytest.raises(KeyError):
        s.setting("nope")


def test_threads_follow_omp_num_threads():
    assert default_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert 1 <= default_threads({}) <= 2


def test_setup_loads_what_is_asked_and_sets_threads(monkeypatch):
    monkeypatch.delenv("PERSVIZ_SCALE", raising=False)
    before = torch.get_num_threads()
    try:
        s = setup(pipeline=False, evaluators=("oracle",), threads=1)
        assert s.scale == "shapesworld" and not s.full and torch.get_num_threads() == 1
        assert s.pipe is None and s.clip is None and s.dino is None and s.oracle is not None
        assert "ShapesWorld" in str(s) and "oracle" in str(s)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="unknown evaluators"):
        setup(pipeline=False, evaluators=("clipp",))


def test_full_scale_has_no_oracle(monkeypatch):
    """At full scale the ShapesWorld oracle is not loaded (and nothing else is asked for here)."""
    before = torch.get_num_threads()
    try:
        s = setup(pipeline=False, evaluators=("oracle",), scale="full", threads=before)
    finally:
        torch.set_num_threads(before)
    assert s.full and s.oracle is None


def test_every_setting_names_its_variable():
    assert all(var.startswith("PERSVIZ_") for var, _ in session.SETTINGS_ENV.values())


def session_at(scale, **env):
    return Session(scale, settings=read_settings(scale, env))


def make_concept(folder, placeholder="<my-dog>", model=SD15):
    folder.mkdir(parents=True)
    write_concept(Concept(placeholder=placeholder, class_word="dog", model=model, name=folder.name, folder=folder,
                          runs={"textual_inversion": {"folder": "textual_inversion", "token": placeholder}}))
    return folder


def test_shapesworld_concepts_default_to_the_shipped_folders():
    s = session_at("shapesworld")
    assert [c.name for c in s.concepts()] == list(CONCEPTS)
    assert all(c.folder == (CONCEPTS_DIR / c.name).resolve() and c.model == "shapesworld" for c in s.concepts())
    assert s.concept().name == "candy" and s.concept().placeholder == "<candy>"  # the studied one
    assert s.second_concept().name == "spark"  # the multi-concept section's fixed one (TI never learned checkers)
    assert s.oracle_note == ""


def test_full_scale_without_a_concept_names_persviz_train():
    s = session_at("full")
    for call in (s.concepts, s.concept, s.second_concept):
        with pytest.raises(ConceptFolderError, match=r"PERSVIZ_CONCEPT=.*persviz train textual-inversion"):
            call()
    assert "ShapesWorld only" in s.oracle_note


def test_concept_folders_come_from_persviz_concept(tmp_path):
    a, b = make_concept(tmp_path / "dog"), make_concept(tmp_path / "cat", "<my-cat>")
    one = session_at("full", PERSVIZ_CONCEPT=str(a))
    assert one.concept().placeholder == "<my-dog>" and one.second_concept() is None  # the dominance section skips
    two = session_at("full", PERSVIZ_CONCEPT=f"{a}, {b}")
    assert [c.name for c in two.concepts()] == ["dog", "cat"] and two.second_concept().name == "cat"
    # on ShapesWorld PERSVIZ_CONCEPT is read too; a ShapesWorld concept folder replaces the shipped ones
    own = session_at("shapesworld", PERSVIZ_CONCEPT=str(CONCEPTS_DIR / "spark"))
    assert own.concept().name == "spark" and own.second_concept() is None


def test_concepts_of_the_other_scale_or_missing_are_refused(tmp_path):
    with pytest.raises(ConceptFolderError, match="trained on 'shapesworld'.*PERSVIZ_SCALE=shapesworld"):
        session_at("full", PERSVIZ_CONCEPT=str(CONCEPTS_DIR / "candy")).concepts()
    with pytest.raises(ConceptFolderError, match="trained on 'stable-diffusion.*PERSVIZ_SCALE=full"):
        session_at("shapesworld", PERSVIZ_CONCEPT=str(make_concept(tmp_path / "dog"))).concepts()
    with pytest.raises(ConceptFolderError, match="no concept.json.*persviz train"):
        session_at("full", PERSVIZ_CONCEPT=str(tmp_path / "nothing")).concept()
    with pytest.raises(ConceptFolderError, match="names no folder"):
        session_at("full", PERSVIZ_CONCEPT=" , ").concepts()


def test_generation_settings_follow_the_scale_and_the_environment():
    assert session_at("shapesworld").generation() == SHAPESWORLD_GENERATION == {"steps": 25, "guidance": 4.0,
                                                                                 "batch_size": 50}
    assert session_at("full").generation() == PAPER_GENERATION == {"steps": 50, "guidance": 7.0, "batch_size": 8}
    env = {"PERSVIZ_STEPS": "2", "PERSVIZ_GUIDANCE": "3.5", "PERSVIZ_BATCH_SIZE": "4", "PERSVIZ_PROBES": "3"}
    full = session_at("full", **env)
    assert full.generation() == {"steps": 2, "guidance": 3.5, "batch_size": 4} and full.n_probes(8) == 3
    small = session_at("shapesworld", **env)  # ShapesWorld keeps its figures: the knobs are full-scale only
    assert small.generation() == SHAPESWORLD_GENERATION and small.n_probes(8) == 8
    for var, bad, why in (("PERSVIZ_STEPS", "2.5", "integer"), ("PERSVIZ_GUIDANCE", "high", "number"),
                          ("PERSVIZ_BATCH_SIZE", "0", "positive")):
        with pytest.raises(ValueError, match=f"{var}=.*{why}"):
            session_at("full", **{var: bad}).generation()


def test_setup_refuses_a_bad_number_before_loading(monkeypatch):
    monkeypatch.setenv("PERSVIZ_PROBES", "many")
    with pytest.raises(ValueError, match="PERSVIZ_PROBES"):
        setup(pipeline=False, evaluators=(), scale="full", threads=torch.get_num_threads())


def test_paper_sampling_is_dpm_solver_pp_with_vae_slicing():
    from diffusers import DPMSolverMultistepScheduler
    pipe = make_tiny_sd_pipeline()
    betas = pipe.scheduler.config.beta_schedule
    assert paper_sampling(pipe) is pipe
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.beta_schedule == betas
    assert pipe.vae.use_slicing

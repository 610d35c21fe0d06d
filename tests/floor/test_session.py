"""persviz.session: the scale, the settings and the threads a notebook opens with (models loaded once, tiny)."""
import pytest
import torch

from persviz import session
from persviz.session import Session, default_threads, read_settings, resolve_scale, setup


def test_scale_comes_from_the_argument_or_the_environment():
    assert resolve_scale(env={}) == "shapesworld"
    assert resolve_scale(env={"PERSVIZ_SCALE": " Full "}) == "full"
    assert resolve_scale("shapesworld", env={"PERSVIZ_SCALE": "full"}) == "shapesworld"
    with pytest.raises(ValueError, match="not understood"):
        resolve_scale(env={"PERSVIZ_SCALE": "huge"})


def test_full_scale_settings_are_read_at_full_scale_only():
    env = {"PERSVIZ_TI_RUNS": "/runs", "PERSVIZ_FINEXL_LORA": "", "PERSVIZ_PIGEON_WEIGHTS": "/snap"}
    assert read_settings("shapesworld", env) == {"ti_runs": None, "finexl_lora": None, "finexl_class": None,
                                                 "pigeon_weights": "/snap"}
    full = read_settings("full", env)
    assert full["ti_runs"] == "/runs" and full["finexl_lora"] is None  # empty counts as unset
    s = Session("full", settings=full)
    assert s.full and s.setting("ti_runs", "x") == "/runs" and s.setting("finexl_class", "dog") == "dog"
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

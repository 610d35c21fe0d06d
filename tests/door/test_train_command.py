"""`persviz train`: concept folders on the ShapesWorld micro-SD (fast), the recipe defaults, and every bad input a
clear error with nothing written."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from persviz.cli import main as cli_main
from persviz.concept_folder import ConceptFolderError, read_concept
from persviz.evaluation import Evaluation
from persviz.shapesworld.concepts import CONCEPTS_DIR
from persviz.trainers.recipes import recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def checkers_images(tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(CONCEPTS_DIR / "checkers" / "images", folder)
    return folder


# one step and 2 class images for the prior-preservation methods (their recipes' 200 take most of a minute each)
FAST_PRIOR = ("--steps", "1", "--num-class-images", "2")


def train(method, images, out, *extra):
    return cli_main(["train", method, "--images", str(images), "--class-word", "square", "--placeholder", "<chk>",
                     "--out", str(out), "--steps", "2", "--save-every", "1", "--no-progress", *extra])


def test_three_methods_into_one_concept_folder(tmp_path, checkers_images):
    out = tmp_path / "checkers"
    for method in ("ti", "dreambooth", "custom-diffusion"):
        run = train(method, checkers_images, out, *(FAST_PRIOR if method != "ti" else []))
        assert run.result.steps in (1, 2)
    concept = read_concept(out)
    assert (concept.placeholder, concept.class_word, concept.model) == ("<chk>", "square", "shapesworld")
    assert set(concept.runs) == {"textual_inversion", "dreambooth", "custom_diffusion"}
    assert concept.token("dreambooth") == "sks" and concept.token("custom_diffusion") == "<chk>"
    assert sorted((out / "textual_inversion").glob("learned_embeds-steps-*.safetensors"))
    assert (out / "dreambooth" / "pytorch_lora_weights.safetensors").is_file()
    refs = concept.reference_images()
    assert refs.shape[0] == len(list(checkers_images.iterdir())) and refs.dtype == np.uint8
    saved = json.loads((out / "textual_inversion" / "config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["steps"] == 2  # ShapesWorld's recipe, the asked steps


def test_a_run_resumes_and_extends(tmp_path, checkers_images):
    out = tmp_path / "c"
    train("ti", checkers_images, out)
    run = train("ti", checkers_images, out, "--steps", "3")
    assert run.result.steps == 3 and len(run.result.loss_history) == 3


def test_the_recipes_follow_the_model():
    assert recipe("textual_inversion", "<v>", "dog", shapesworld=False).lr == 5e-4
    assert recipe("textual_inversion", "<v>", "dog", shapesworld=False).steps == 3000
    assert recipe("textual_inversion", "<v>", "dog", shapesworld=False).save_every == 100
    db = recipe("dreambooth", "sks", "dog", shapesworld=False)
    assert (db.rank, db.lr, db.train_text_encoder, db.prior_preservation, db.prior_loss_weight) == (
        4, 1e-4, True, True, 1.0)
    cd = recipe("custom_diffusion", "<v>", "dog", shapesworld=False)
    assert (cd.lr, cd.steps) == (5e-6, 2000)
    assert recipe("custom_diffusion", "<v>", "dog", shapesworld=True).lr == 1e-4
    assert dataclasses.replace(db, steps=5) == recipe("dreambooth", "sks", "dog", shapesworld=False, steps=5)


def _nothing_written(out):
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case,match", [
    ("empty", "is empty"),
    ("not_images", "not images"),
    ("unreadable", "not a readable image"),
    ("multi_token_class", "is 2 tokens"),
    ("known_placeholder", "already a token"),
])
def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, checkers_images, case, match):
    out, images, argv = tmp_path / "out", checkers_images, {"--class-word": "square", "--placeholder": "<chk>"}
    if case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "not_images":
        (images / "notes.txt").write_text("hello")
    elif case == "unreadable":
        (images / "broken.png").write_bytes(b"not a png")
    elif case == "multi_token_class":
        argv["--class-word"] = "red square"
    elif case == "known_placeholder":
        argv["--placeholder"] = "circle"
    for method in ("ti", "custom-diffusion"):
        with pytest.raises(SystemExit, match=match):
            cli_main(["train", method, "--images", str(images), "--out", str(out), "--steps", "1", "--no-progress",
                      *[x for kv in argv.items() for x in kv]])
        assert _nothing_written(out)


def test_dreambooth_takes_an_existing_identifier_and_a_multi_word_class(tmp_path, checkers_images):
    run = cli_main(["train", "dreambooth", "--images", str(checkers_images), "--class-word", "red square",
                    "--placeholder", "<chk>", "--out", str(tmp_path / "db"), *FAST_PRIOR, "--no-progress"])
    assert run.concept.token("dreambooth") == "sks"


def test_an_existing_concept_folder_must_match(tmp_path, checkers_images):
    out = tmp_path / "c"
    train("ti", checkers_images, out)
    before = (out / "concept.json").read_text()
    with pytest.raises(SystemExit, match="class word 'square', not 'circle'"):
        cli_main(["train", "ti", "--images", str(checkers_images), "--class-word", "circle", "--placeholder", "<chk>",
                  "--out", str(out), "--steps", "2", "--no-progress"])
    assert (out / "concept.json").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("not a concept")
    with pytest.raises(SystemExit, match="not empty and has no concept.json"):
        train("ti", checkers_images, other)


def test_a_folder_without_concept_json_is_refused(tmp_path):
    with pytest.raises(ConceptFolderError, match="no concept.json.*persviz train"):
        read_concept(tmp_path)


def test_images_of_different_sizes_are_refused(tmp_path, checkers_images):
    Image.new("RGB", (40, 40)).save(checkers_images / "z.png")
    with pytest.raises(SystemExit, match="different sizes"):
        train("ti", checkers_images, tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_study_of_a_concept_folder(tmp_path, checkers_images):
    """`persviz study` after `persviz train` of all three methods: JSON and figures, with the oracle on ShapesWorld."""
    out = tmp_path / "checkers"
    train("ti", checkers_images, out, "--steps", "4", "--save-every", "2")
    train("dreambooth", checkers_images, out, *FAST_PRIOR)
    train("custom-diffusion", checkers_images, out, *FAST_PRIOR)
    study = cli_main(["study", str(out), "--probes", "2", "--every", "2", "--steps", "2", "--no-progress"])
    saved = json.loads((out / "study" / "study.json").read_text())
    assert saved["text"]["step"] == [2, 4] and len(saved["text"]["norm_ratio"]) == 2
    assert saved["images"]["step"] == [0, 2, 4] and "oracle_context" in saved["images"]
    rows = set(saved["tea_table"])
    assert {"textual_inversion", "textual_inversion TEA", "dreambooth", "dreambooth TEA", "dreambooth TEA unaligned",
            "dreambooth TEA base anchor", "custom_diffusion", "custom_diffusion TEA"} <= rows
    assert all(0 <= r["oracle_context"] <= 1 for r in saved["tea_table"].values())
    # every image's scores kept; the table's means are the Evaluation's, with intervals and paired differences
    ev = Evaluation.from_json(saved["tea_evaluation"])
    assert ev.meta["counts"]["textual_inversion"] == {"prompts": 2, "images": 2}
    for row in rows:
        assert saved["tea_table"][row]["clip_i"] == pytest.approx(np.mean(ev.items[row]["clip_i"]))
        iv = saved["tea_intervals"][row]["clip_i"]
        assert iv["low"] <= iv["mean"] <= iv["high"] and iv["n_prompts"] == 2
    d = saved["tea_differences"]["dreambooth TEA base anchor"]["clip_i"]
    assert d["mean"] == pytest.approx(np.mean(np.subtract(ev.items["dreambooth TEA base anchor"]["clip_i"],
                                                          ev.items["dreambooth"]["clip_i"])))
    assert set(saved["tea_differences"]) == rows - {"textual_inversion", "dreambooth", "custom_diffusion"}
    assert sorted(p.name for p in (out / "study").glob("*.png")) == ["impacts.png", "norm_ratio.png",
                                                                     "shift_grid.png"]
    assert len(study["figures"]) == 3


def test_study_refuses_a_folder_without_concept_json(tmp_path):
    with pytest.raises(SystemExit, match="no concept.json"):
        cli_main(["study", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_sd2_pipelines_are_refused_and_sdxl_ones_train_textual_inversion_only():
    from types import SimpleNamespace

    from persviz.families import FAMILIES, family_of
    from persviz.trainers.concept_runs import check_sd1

    def pipe(width, second=None):
        return SimpleNamespace(text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=width)),
                               text_encoder_2=second, tokenizer=object(), tokenizer_2=second)
    check_sd1(pipe(768), "sd15")
    check_sd1(pipe(32), "a reduced-width SD 1.5")
    with pytest.raises(ValueError, match="Stable Diffusion 2.x.*Stable Diffusion 1.x and SDXL, not 2.x"):
        check_sd1(pipe(1024), "stabilityai/stable-diffusion-2-1")
    xl = pipe(768, second=object())
    assert family_of(xl) is FAMILIES["sdxl"]  # a family now: loaded, prepared, inspected per encoder
    check_sd1(xl, "stabilityai/stable-diffusion-xl-base-1.0")  # Textual Inversion trains on SDXL
    from persviz.families import training_family
    from persviz.methods import get_method
    assert training_family(xl, "stabilityai/stable-diffusion-xl-base-1.0", get_method("dreambooth")) is FAMILIES["sdxl"]
    with pytest.raises(ValueError, match="persviz trains textual_inversion and dreambooth on Stable Diffusion XL so "
                       "far, not custom_diffusion"):
        training_family(xl, "stabilityai/stable-diffusion-xl-base-1.0", get_method("custom_diffusion"))

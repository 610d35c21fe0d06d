"""Bad input, as an attacker and a careless user would give it: every case ends in one line naming the problem and
the fix (no traceback, no colour codes; --debug shows the traceback), writes never leave the folder the command
was given, and nothing persviz did not write is replaced or deleted. Each test names the case of issue 20."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persviz import shards
from persviz.cli import INTERRUPTED, main as cli_main
from persviz.concept_folder import concept_paths, format_paths, read_concept
from persviz.errors import OutsideFolderError, TrainingInterrupted
from persviz.io import confined
from persviz.shapesworld.concepts import CONCEPTS_DIR
from persviz.tea.concept_study import write_figures
from persviz.trainers import core

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fails(argv, capsys) -> str:
    """The command's one-line error (exit status 1), checked to be one line without colour codes or traceback."""
    with pytest.raises(SystemExit) as info:
        cli_main([str(a) for a in argv])
    msg = str(info.value.code)
    assert info.value.code not in (0, None) and msg.startswith(f"persviz {argv[0]}: ")
    assert "\n" not in msg and "\x1b" not in msg and "Traceback" not in msg
    assert "Traceback" not in capsys.readouterr().err
    return msg


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(CONCEPTS_DIR / "checkers" / "images", folder)
    return folder


def train_argv(photos, out, *extra):
    return ["train", "ti", "--images", photos, "--class-word", "square", "--placeholder", "<chk>", "--out", out,
            "--steps", "2", "--save-every", "1", "--no-progress", *extra]


@pytest.fixture
def candy(tmp_path):
    """A copy of the shipped candy concept folder with its Textual Inversion run only."""
    folder = tmp_path / "candy"
    shutil.copytree(CONCEPTS_DIR / "candy", folder, ignore=shutil.ignore_patterns("dreambooth", "custom_diffusion",
                                                                                 "sweep"))
    d = json.loads((folder / "concept.json").read_text())
    d["runs"] = {"textual_inversion": d["runs"]["textual_inversion"]}
    (folder / "concept.json").write_text(json.dumps(d))
    return folder


# ----------------------------------------------------------------------------- writes that leave their folder


def test_study_into_a_study_folder_that_links_elsewhere_is_refused_and_deletes_nothing(tmp_path, candy, capsys):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cells").mkdir(parents=True)
    (elsewhere / "cells" / "precious.json").write_text("{}")
    (elsewhere / "manifest.json").write_text('{"format": "another tool"}')
    (candy / "study").symlink_to(elsewhere)
    msg = fails(["study", candy, "--no-progress"], capsys)
    assert "leads outside" in msg and "remove the link" in msg
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["cells", "manifest.json", "precious.json"]


def test_a_figure_that_is_a_link_to_a_file_is_never_overwritten(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    folder, target = tmp_path / "C", tmp_path / "thesis.png"
    (folder / "study").mkdir(parents=True)
    target.write_bytes(b"my thesis figure")
    (folder / "study" / "impacts.png").symlink_to(target)
    study = {"images": {"step": [0, 1], "clip_t_concept": [20.0, 25.0], "clip_t_context": [30.0, 26.0]}}
    with confined(folder), pytest.raises(OutsideFolderError):
        write_figures(study, folder / "study")
    assert target.read_bytes() == b"my thesis figure"
    written = write_figures(study, folder / "study")  # outside a confined block: the link is replaced, not followed
    assert target.read_bytes() == b"my thesis figure" and not written[0].is_symlink()
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_into_a_run_folder_that_links_elsewhere_is_refused(tmp_path, photos, capsys):
    out = tmp_path / "C"
    cli_main([str(a) for a in train_argv(photos, out)])  # a concept folder of persviz's own
    shutil.rmtree(out / "textual_inversion")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "textual_inversion").symlink_to(elsewhere)
    msg = fails(train_argv(photos, out), capsys)
    assert "leads outside" in msg and list(elsewhere.iterdir()) == []


def test_a_restarted_grid_deletes_only_the_cell_files_its_own_manifest_lists(tmp_path):
    class One:
        process_index, num_processes, is_main_process = 0, 1, True

        def wait_for_everyone(self):
            pass

    folder = tmp_path / "grid"
    shards.run_cells([shards.cell(a=1), shards.cell(a=2)], lambda c: c["a"], folder, state=One(), progress=False)
    (folder / "cells" / "mine.txt").write_text("a user's note")
    (folder / "cells" / "notes").mkdir()
    assert shards.run_cells([shards.cell(b=1)], lambda c: 7, folder, state=One(), progress=False,
                            on_mismatch="restart") == {"b1": 7}
    assert sorted(p.name for p in (folder / "cells").iterdir()) == ["b1.json", "mine.txt", "notes"]


def test_paths_recorded_in_concept_json_are_resolved_and_shown(tmp_path, candy, capsys):
    outside = tmp_path / "adopted_run"
    shutil.copytree(candy / "textual_inversion", outside)
    d = json.loads((candy / "concept.json").read_text())
    d["runs"]["textual_inversion"]["folder"] = "../adopted_run"
    d["images"] = d["images"][:1] + ["/nonexistent/photo.png"]
    (candy / "concept.json").write_text(json.dumps(d))
    paths = {p["what"]: p for p in concept_paths(read_concept(candy))}
    assert paths["textual_inversion run"]["resolved"] == str(outside.resolve())
    assert not paths["textual_inversion run"]["inside"] and paths["textual_inversion run"]["exists"]
    assert paths["image 1"]["inside"] and not paths["image 2"]["inside"] and not paths["image 2"]["exists"]
    assert "OUTSIDE the folder (read only)" in format_paths(read_concept(candy))
    cli_main(["doctor", str(candy)])
    assert f"../adopted_run -> {outside.resolve()} (OUTSIDE the folder (read only))" in capsys.readouterr().out


def test_training_over_an_adopted_run_is_refused(tmp_path, photos, capsys):
    out = tmp_path / "C"
    cli_main([str(a) for a in train_argv(photos, out)])
    d = json.loads((out / "concept.json").read_text())
    d["runs"]["textual_inversion"] |= {"folder": str(tmp_path / "theirs"), "source": "a1111"}
    (out / "concept.json").write_text(json.dumps(d))
    assert "persviz only reads" in fails(train_argv(photos, out), capsys)


# ----------------------------------------------------------------------------- one sentence for every error


@pytest.mark.parametrize("record,match", [
    ([], "holds a JSON list, not an object"),
    ({"format": 1, "placeholder": 3, "class_word": "circle", "model": "shapesworld"}, "'placeholder' is a int"),
    ({"format": 1, "placeholder": "<c>", "class_word": "circle", "model": "shapesworld", "runs": []},
     "'runs' is not an object"),
    ({"format": 1, "placeholder": "<c>", "class_word": "circle", "model": "shapesworld", "images": "a.png"},
     "'images' is not a list"),
])
def test_a_malformed_concept_json_is_one_sentence(tmp_path, capsys, record, match):
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "concept.json").write_text(json.dumps(record))
    assert match in fails(["study", tmp_path / "C"], capsys)


def test_a_run_folder_that_does_not_exist_is_one_sentence(candy, capsys):
    shutil.rmtree(candy / "textual_inversion")
    msg = fails(["study", candy], capsys)
    assert "does not exist" in msg and "persviz adopt" in msg


def test_a_damaged_resume_state_is_one_sentence(tmp_path, photos, capsys):
    out = tmp_path / "C"
    cli_main([str(a) for a in train_argv(photos, out)])
    state = out / "textual_inversion" / core.RESUME_FILE
    state.write_bytes(state.read_bytes()[:100])
    msg = fails(train_argv(photos, out)[:-5] + ["--steps", "3", "--save-every", "1", "--no-progress"], capsys)
    assert "does not load as a persviz state file" in msg and "run the same command again" in msg


def test_an_out_that_is_a_file_is_one_sentence(tmp_path, photos, capsys):
    (tmp_path / "C").write_text("a file")
    assert "is a file, not a folder" in fails(train_argv(photos, tmp_path / "C"), capsys)


@pytest.mark.parametrize("code,match", [(errno.EACCES, "permission denied for"), (errno.EROFS, "read-only file system"),
                                        (errno.ENOSPC, "the disk is full")])
def test_operating_system_errors_on_write_are_one_sentence(tmp_path, photos, capsys, monkeypatch, code, match):
    import persviz.io
    real = persviz.io.tempfile.mkstemp

    def refuse(*args, dir=None, **kw):
        raise OSError(code, "refused", str(dir))
    monkeypatch.setattr(persviz.io.tempfile, "mkstemp", refuse)
    msg = fails(train_argv(photos, tmp_path / "C"), capsys)
    assert match in msg and str(tmp_path / "C") in msg
    monkeypatch.setattr(persviz.io.tempfile, "mkstemp", real)


def test_a_decompression_bomb_among_the_photos_is_one_sentence(tmp_path, photos, capsys):
    Image.new("1", (8200, 8200)).save(photos / "zz_bomb.png")
    assert "more than persviz reads" in fails(train_argv(photos, tmp_path / "C"), capsys)
    assert not (tmp_path / "C").exists()


def test_torch_colour_codes_never_reach_the_user_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from persviz.tea import inspect_file

    def boom(*a, **k):
        raise RuntimeError("\x1b[1mWeights only load failed\x1b[0m.\n\t(1) In PyTorch 2.6 ...")
    monkeypatch.setattr(inspect_file, "load_text_stack", boom)  # the loader persviz inspect uses
    f = CONCEPTS_DIR / "candy" / "textual_inversion" / "learned_embeds.safetensors"
    msg = fails(["inspect", f], capsys)
    assert "Weights only load failed. (1) In PyTorch 2.6" in msg and "--debug" in msg
    with pytest.raises(RuntimeError, match="Weights only"):
        cli_main(["inspect", str(f), "--debug"])
    monkeypatch.setenv("PERSVIZ_DEBUG", "1")
    with pytest.raises(RuntimeError, match="Weights only"):
        cli_main(["inspect", str(f)])


# ----------------------------------------------------------------------------- Ctrl-C during training


def test_ctrl_c_during_training_says_where_it_stopped_exits_130_and_the_same_command_resumes(
        tmp_path, photos, capsys, monkeypatch):
    class CtrlCAfterThree:
        """tqdm that raises KeyboardInterrupt on its third update, as Ctrl-C in the third step would."""

        def __init__(self, *a, **k):
            self.n = 0

        def update(self, n):
            self.n += 1
            if self.n == 3:
                raise KeyboardInterrupt

        def set_postfix(self, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(core, "tqdm", CtrlCAfterThree)
    argv = train_argv(photos, tmp_path / "C")[:-5] + ["--steps", "6", "--save-every", "2", "--no-progress"]
    with pytest.raises(SystemExit) as info:
        cli_main([str(a) for a in argv])
    assert info.value.code == INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("persviz train: ") and "stopped after 3 of 6 steps" in err
    assert "the state of step 2 is kept and the same command resumes from it" in err
    monkeypatch.undo()
    run = cli_main([str(a) for a in argv])
    assert run.result.steps == 6 and len(run.result.losses) == 6  # 2 steps restored, 4 run


def test_run_steps_turns_ctrl_c_into_a_keyboard_interrupt_that_names_the_saved_step():
    saved = []

    def step(s):
        if s == 4:
            raise KeyboardInterrupt
        return 0.0
    with pytest.raises(TrainingInterrupted) as info:
        core.run_steps(start=1, steps=9, save_every=3, step=step, history=[], snapshot=None,
                       save_state=saved.append, after=None, desc="ti", progress=False)
    assert isinstance(info.value, KeyboardInterrupt) and saved == [3]
    assert (info.value.step, info.value.saved) == (4, 3)
    assert str(info.value) == "ti stopped after 4 of 9 steps (Ctrl-C); the state of step 3 is kept and the same " \
                              "command resumes from it"

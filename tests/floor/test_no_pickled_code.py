"""No file persviz loads can run code: a payload is planted in every kind of torch file persviz reads (zip and
legacy pickle containers) and each reader must refuse it with a sentence while the payload's marker file stays
absent. The control test shows the payload does run when a file is loaded the unsafe way, so these tests can fail.

Files persviz loads with torch.load, and the test that covers each:
| file | reader | test |
| embedding files (.pt, .bin: A1111, kohya, diffusers) | embedding_files.read_embedding_file (inspect, fix, adopt) | test_embedding_file |
| learned_embeds.bin / snapshots | embeddings.load_learned_embeds (tracker, TEA, studies) | test_learned_embeds |
| LoRA / weight files (.bin, .pt) | weight_files.read_weights (adopt dreambooth, finexl explain) | test_weight_file |
| resume_state.pt of every trainer (TI, DreamBooth, Custom Diffusion, LoRA, Pigeon) | trainers.core.check_out_dir | test_resume_state |
| Pigeon's pairs.pt (stage 2, resumable) | pigeon.train.build_pairs | test_pigeon_pairs_resume |
| Pigeon's pairs.pt / pairs_sample.pt (study) | pigeon.study.load_pairs | test_pigeon_pairs_study |
| ShapesWorld stage snapshots data/cache/<stage>.pt | shapesworld.train.run_loop | test_shapesworld_stage_cache |
| ShapesWorld latents cache data/cache/latents_N.pt | shapesworld.train.encoded_latents | test_shapesworld_latents_cache |
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from persviz.errors import PersvizError
from tests.payloads import Payload, legacy_pickle

CONTAINERS = ("zip", "legacy")


def plant(path: Path, obj_of, container: str) -> Path:
    """Write obj_of(payload) to path as a torch zip file or a legacy pickle; returns the marker path."""
    marker = path.parent / f"{path.name}.ran"
    obj = obj_of(Payload(marker))
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "zip":
        torch.save(obj, path)
    else:
        legacy_pickle(obj, path)
    return marker


def refused(call, marker: Path, match: str = "") -> str:
    """call() raises a persviz error (one sentence) and the payload did not run."""
    with pytest.raises((PersvizError, ValueError)) as info:
        call()
    assert not marker.exists(), "the payload ran"
    assert "\n" not in str(info.value) and (match in str(info.value))
    return str(info.value)


@pytest.mark.parametrize("container", CONTAINERS)
def test_the_payload_runs_when_loaded_unsafely(tmp_path, container):
    marker = plant(tmp_path / "x.pt", lambda p: {"w": p}, container)
    if container == "zip":
        torch.load(tmp_path / "x.pt", weights_only=False)
    else:
        with open(tmp_path / "x.pt", "rb") as fh:
            pickle.load(fh)
    assert marker.exists()


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", ["candy.pt", "learned_embeds.bin"])
def test_embedding_file(tmp_path, container, name):
    from persviz.embedding_files import read_embedding_file
    marker = plant(tmp_path / name, lambda p: {"string_to_param": {"*": p}, "name": "candy"}, container)
    refused(lambda: read_embedding_file(tmp_path / name), marker, "weights_only")


@pytest.mark.parametrize("container", CONTAINERS)
def test_learned_embeds(tmp_path, container):
    from persviz.embeddings import load_learned_embeds
    marker = plant(tmp_path / "learned_embeds-steps-100.bin", lambda p: {"<candy>": p}, container)
    refused(lambda: load_learned_embeds(tmp_path / "learned_embeds-steps-100.bin"), marker, "weights_only")


@pytest.mark.parametrize("container", CONTAINERS)
def test_weight_file(tmp_path, container):
    from persviz.weight_files import read_weights
    marker = plant(tmp_path / "pytorch_lora_weights.bin", lambda p: {"unet.x.lora_A.weight": p}, container)
    refused(lambda: read_weights(tmp_path / "pytorch_lora_weights.bin"), marker, "weights_only")


@pytest.mark.parametrize("container", CONTAINERS)
def test_resume_state(tmp_path, container):
    from persviz.trainers.core import CONFIG_FILE, RESUME_FILE, check_out_dir
    record = {"steps": 10, "lr": 0.1}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    marker = plant(tmp_path / RESUME_FILE, lambda p: {"step": 5, "rows": p}, container)
    text = refused(lambda: check_out_dir(tmp_path, record, lambda n: False, "weights", "hint"), marker)
    assert "same command again" in text


@pytest.mark.parametrize("container", CONTAINERS)
def test_pigeon_pairs_resume(tmp_path, container):
    from persviz.pigeon.train import TrainConfig, build_pairs
    marker = plant(tmp_path / "pairs.pt", lambda p: {"done": 0, "window": p}, container)
    config = TrainConfig(stage=2, n_pairs=2, init_from=str(tmp_path))
    pipe = SimpleNamespace(scorer=object())
    refused(lambda: build_pairs(pipe, [0, 1, 2, 3], config, tmp_path / "pairs.pt", progress=False), marker)


@pytest.mark.parametrize("container", CONTAINERS)
def test_pigeon_pairs_study(tmp_path, container):
    from persviz.pigeon.study import load_pairs
    marker = plant(tmp_path / "pairs.pt", lambda p: {"done": 1, "window": [p]}, container)
    refused(lambda: load_pairs(tmp_path), marker)


@pytest.mark.parametrize("container", CONTAINERS)
def test_shapesworld_stage_cache(tmp_path, container, monkeypatch):
    from persviz.shapesworld import train as world_train
    monkeypatch.setattr(world_train, "CACHE", tmp_path)
    marker = plant(tmp_path / "clip.pt", lambda p: {"step": 1, "model": p}, container)
    model = torch.nn.Linear(1, 1)
    refused(lambda: world_train.run_loop("clip", 2, {"model": model}, lambda s: 0.0), marker, "delete it")


@pytest.mark.parametrize("container", CONTAINERS)
def test_shapesworld_latents_cache(tmp_path, container, monkeypatch):
    from persviz.shapesworld import train as world_train
    monkeypatch.setattr(world_train, "CACHE", tmp_path)
    marker = plant(tmp_path / "latents_3.pt", lambda p: p, container)
    refused(lambda: world_train.encoded_latents(None, np.zeros((3, 4, 4, 3), np.uint8)), marker, "delete it")


def test_no_torch_load_in_persviz_without_weights_only():
    """Every torch.load call in the package passes weights_only=True (read from the source, call by call)."""
    import ast
    root = Path(__file__).resolve().parents[2] / "persviz"
    bad = []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{f.relative_to(root)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"

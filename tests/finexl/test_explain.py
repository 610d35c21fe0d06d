"""persviz.finexl.model_pair (``persviz finexl explain``): the cells' pair differences gathered in probe order give
the single-call FineXL result (paired_samples, divergence_vector, the benchmark's decompositions); bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from persviz.finexl import model_pair as mp
from persviz.finexl.benchmark import COMPOSERS, METHOD_SPECS, explain_with
from persviz.finexl.concepts import SHAPESWORLD_WORD_BANK, concept_directions
from persviz.finexl.concept_pair import FineXLTargetError
from persviz.finexl.decompose import divergence_vector
from persviz.finexl.generators import SceneShiftGenerator, paired_samples, shapesworld_probes
from persviz.shards import run_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def test_chunked_pairs_gather_to_the_single_call_result(clip_eval, tmp_path):
    probes, scenes = shapesworld_probes(5, seed=1, p_second=0.0)
    by = dict(zip(probes, scenes))
    base, personal = SceneShiftGenerator({}, scenes=by), SceneShiftGenerator({"red": 1.0, "large": 0.5}, scenes=by)
    seeds = [0, 1000]
    cells = mp.explain_cells(len(probes), 2)
    assert [c["id"] for c in cells] == ["prompts0-2", "prompts2-4", "prompts4-5"]

    def compute(c):
        a, b = c["prompts"]
        return {"diffs": mp.chunk_differences(base, personal, clip_eval, probes[a:b], a, seeds)}
    diffs = mp.gather_differences(run_cells(cells, compute, tmp_path, state=OneProcess(), progress=False), cells)
    assert diffs.shape[:2] == (5, 2)
    v, spread = mp.divergence_from_differences(diffs)

    imgs_b, imgs_p = paired_samples(base, personal, probes, seeds=seeds)  # the notebook's single call
    v_ref, spread_ref = divergence_vector(clip_eval.embed_images(imgs_p), clip_eval.embed_images(imgs_b))
    assert float((v - v_ref).abs().max()) <= 1e-6 and abs(spread - spread_ref) <= 1e-6

    directions = {k: concept_directions(clip_eval.embed_texts, probes, SHAPESWORLD_WORD_BANK, compose=COMPOSERS[k])
                  for k in ("append", "grammar")}
    out = mp.decompose_pair(v, directions, ["finexl", "persviz"])
    for m in ("finexl", "persviz"):
        ref = explain_with(METHOD_SPECS[m], v_ref, directions[METHOD_SPECS[m].compose])
        assert out[m]["names"] == ref.names
        assert np.allclose(list(out[m]["weights"].values()), ref.weights.numpy(), atol=1e-6)
        assert abs(out[m]["relative_residual"] - ref.relative_residual) <= 1e-6
    assert "red" in out["persviz"]["weights"]


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one probe"):
        mp.explain_cells(0)
    with pytest.raises(ValueError, match="--chunk must be at least 1"):
        mp.explain_cells(4, -1)
    assert len(mp.explain_cells(4, None)) == 1
    with pytest.raises(ValueError, match="closer than the 4 probes"):
        mp.check_seeds([0, 2], 4)
    with pytest.raises(FineXLTargetError, match="does not exist"):
        mp.pair_target(tmp_path / "no_such.safetensors")
    assert mp.pair_target("red_100").lora.name == "pytorch_lora_weights.safetensors"
    with pytest.raises(ValueError, match="need f\\(C\\) by"):
        mp.check_methods(["persviz"], ["append"])
    with pytest.raises(ValueError, match="unknown method"):
        mp.check_methods(["nope"], ["append"])
    assert torch.is_tensor(mp.divergence_from_differences(np.ones((2, 1, 3)))[0])

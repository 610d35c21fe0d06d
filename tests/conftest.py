"""Fixtures shared by every room of the tests. Modules that run tiny models mark themselves
`pytestmark = pytest.mark.usefixtures("one_torch_thread")`; plot modules use `no_global_matplotlib_state`."""
import copy
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def oracle():
    """The shipped ShapesWorld oracle (attribute classifier)."""
    from persviz.loading import load_evaluator
    return load_evaluator(kind="oracle")


@pytest.fixture(scope="session")
def clip_eval():
    """The shipped ShapesWorld CLIP evaluator."""
    from persviz.loading import load_evaluator
    return load_evaluator(kind="clip")


@pytest.fixture(scope="session")
def shapesworld_pipeline():
    """The shipped ShapesWorld micro Stable Diffusion pipeline, one per session (tests leave it as they found it)."""
    from persviz.loading import load_pipeline
    return load_pipeline()


def _pipeline_state(pipe) -> dict:
    """What a test must leave as it found it on the shared pipeline: tokens, vocabulary size, embedding rows,
    attention processors and adapters."""
    te = pipe.text_encoder
    return {"tokens": len(pipe.tokenizer), "vocab_size": te.config.vocab_size,
            "rows": tuple(te.get_input_embeddings().weight.shape),
            "processors": sorted({type(v).__name__ for v in pipe.unet.attn_processors.values()}),
            "adapters": (bool(getattr(pipe.unet, "peft_config", None)), bool(getattr(te, "peft_config", None)))}


@pytest.fixture(autouse=True)
def shared_pipeline_left_as_found(request):
    """Every test that takes the session's ShapesWorld pipeline leaves it as it found it (a grown vocabulary or a
    leftover adapter changes what later tests save and load)."""
    if "shapesworld_pipeline" not in request.fixturenames:
        yield
        return
    pipe = request.getfixturevalue("shapesworld_pipeline")
    before = _pipeline_state(pipe)
    yield
    after = _pipeline_state(pipe)
    assert after == before, f"the test changed the shared pipeline: {before} -> {after}"


@pytest.fixture
def shapesworld_train_in_tmp(tmp_path, monkeypatch):
    """persviz.shapesworld.train writing its cache and models under tmp_path (returned) instead of the real folders."""
    from persviz.shapesworld import train
    monkeypatch.setattr(train, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(train, "SHAPESWORLD_DIR", tmp_path / "shapesworld")
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and far slower with two when the cores are busy); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_sd_pipeline_shared():
    """One tiny random StableDiffusionPipeline per test module; tests that change it take `tiny_sd_pipeline`."""
    from tests.helpers import make_tiny_sd_pipeline
    return make_tiny_sd_pipeline()


@pytest.fixture
def tiny_sd_pipeline(tiny_sd_pipeline_shared):
    """A fresh copy of the module's tiny random StableDiffusionPipeline for one test."""
    return copy.deepcopy(tiny_sd_pipeline_shared)


@pytest.fixture
def tiny_sd_pipeline_with_cat(tiny_sd_pipeline):
    """The tiny pipeline with a learned single-vector placeholder '<cat>' (random_vector(1))."""
    from tests.helpers import random_vector
    tiny_sd_pipeline.load_textual_inversion({"<cat>": random_vector(1)})
    return tiny_sd_pipeline


@pytest.fixture
def no_global_matplotlib_state():
    """Fails a test that changes matplotlib's rcParams or leaves pyplot figures open."""
    import matplotlib
    before = dict(matplotlib.rcParams)
    plt = sys.modules.get("matplotlib.pyplot")
    n_open = len(plt.get_fignums()) if plt else 0
    yield
    assert dict(matplotlib.rcParams) == before
    plt = sys.modules.get("matplotlib.pyplot")
    assert (len(plt.get_fignums()) if plt else 0) == n_open

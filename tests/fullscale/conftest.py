"""Fixtures of the full-scale tests: a Hugging Face cache with SD 1.5, CLIP ViT-L/14 and DINOv2-base under their
real Hub ids, random weights at reduced widths (persviz.sd15.write_offline_hub_cache), and every other family's test
models (Family.write_test_cache: SDXL base), written once per session."""
import pytest


def point_hub_cache(mp: pytest.MonkeyPatch, folder) -> None:
    """Make huggingface_hub (and through it diffusers and transformers) use `folder` as its cache, offline.

    The environment variables are what a fresh process reads; huggingface_hub reads them once at import, so its
    constants are set too."""
    from huggingface_hub import constants
    mp.setenv("HF_HUB_CACHE", str(folder))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(constants, "HF_HUB_CACHE", str(folder))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="package")
def offline_sd15_cache(tmp_path_factory):
    """{'cache_dir': folder, 'snapshots': {hub id: snapshot folder}}: the offline cache, written once, with
    HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1 while the tests of this folder run.

    Package scope: this folder's tests share one cache (one per session, as only they see the fixture), and the
    settings are undone when pytest leaves the folder, so tests elsewhere that expect a missing model (e.g.
    tests/floor/test_loading.py) never see these random weights, whatever order the tests run in."""
    from persviz.families import FAMILIES
    from persviz.sd15 import write_offline_hub_cache
    folder = tmp_path_factory.mktemp("hf_hub_cache")
    snapshots = write_offline_hub_cache(folder, small=True, seed=0)
    for family in FAMILIES.values():
        if not set(family.hub_ids) <= set(snapshots):
            snapshots |= family.write_test_cache(folder, small=True, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        point_hub_cache(mp, folder)
        yield {"cache_dir": folder, "snapshots": snapshots}


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder, offline, for this test only."""
    folder = tmp_path / "empty_hub_cache"
    folder.mkdir()
    point_hub_cache(monkeypatch, folder)
    return folder

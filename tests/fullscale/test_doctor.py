"""`persviz doctor` with and without the offline cache."""
import json

import pytest

from persviz import doctor
from persviz.cli import main
from persviz.hub_models import HUB_MODELS, download_command
from persviz.hub_models import FLUX_DEV, FLUX_SCHNELL, SDXL_BASE
from persviz.loading import CLIP_L14, DINO, DINO_DREAMBENCH, SD15


def test_doctor_without_the_models_says_what_to_download(empty_hub_cache, capsys):
    report = doctor.diagnose()
    assert report["offline"] is True and report["hub_cache"] == str(empty_hub_cache)
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert set(report["versions"]) >= {"persviz", "torch", "diffusers", "transformers", "peft", "open_clip_torch"}
    assert report["versions"]["torch"] and report["versions"]["diffusers"]
    assert set(report["models"]) == {SD15, CLIP_L14, DINO, DINO_DREAMBENCH, SDXL_BASE, FLUX_DEV, FLUX_SCHNELL}
    assert not any(m["cached"] for m in report["models"].values())
    text = doctor.format_report(report)
    for hub_id in HUB_MODELS:
        assert download_command(hub_id) in text and f"MISSING {hub_id}" in text
    assert "huggingface-cli" not in text and "to download next" in text
    assert f"gated: accept its license on https://huggingface.co/{FLUX_DEV}" in text  # FLUX.1-dev is gated
    assert text.count("gated:") == 1 and report["families"]["flux"]["hub_ids"] == [FLUX_DEV, FLUX_SCHNELL]
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "persviz doctor" in out and download_command(SD15) in out


def test_doctor_with_the_offline_cache(offline_sd15_cache, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_sd15_cache["cache_dir"]))
    report = doctor.diagnose()
    assert all(m["cached"] and m["random_weights"] and not m["missing"] for m in report["models"].values())
    text = doctor.format_report(report)
    assert "every full-scale model is in the cache" in text and "hf download" not in text
    assert text.count("random weights") == len(HUB_MODELS) == 7
    assert report["families"]["flux"]["cached"] == [FLUX_DEV, FLUX_SCHNELL]
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][SD15]["cached"] is True


def test_doctor_reads_hf_home_and_online_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    report = doctor.diagnose()
    assert report["hub_cache"] == str(tmp_path / "hub") and report["offline"] is False
    assert "no (missing models download when used)" in doctor.format_report(report)


@pytest.mark.parametrize("hub_id", list(HUB_MODELS))
def test_download_lines_use_the_hf_cli(hub_id):
    line = download_command(hub_id)
    assert line.startswith(f"hf download {hub_id} --include ")
    assert line.count("--include") == len(HUB_MODELS[hub_id].patterns)

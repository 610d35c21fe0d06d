"""`persviz doctor`: what this machine has for persviz (versions, device, Hub models in the cache), no network.

`diagnose()` gathers it as a dict; `format_report(diagnose())` prints it, ending with the `hf download` lines
for the full-scale models that are missing from the local Hugging Face cache.
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Optional

from persviz.families import FAMILIES
from persviz import hub_models
from persviz.loading import SCALE_ENV, full_scale, pick_device
from persviz.sd15 import offline_commit

PACKAGES = ("persviz", "torch", "diffusers", "transformers", "huggingface_hub", "peft", "open_clip_torch")
TRUE = ("1", "true", "yes", "on")


def package_version(name: str) -> Optional[str]:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) turns downloads off."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in TRUE


def diagnose() -> dict[str, Any]:
    """Versions, device and dtype (pick_device), scale, offline mode, cache folder and each Hub model's state."""
    device, dtype = pick_device()
    cache = hub_models.hub_cache_dir()
    try:
        scale = "full" if full_scale() else "shapesworld"
    except ValueError as err:
        scale = f"invalid ({err})"
    models = {}
    for hub_id, model in hub_models.HUB_MODELS.items():
        found = hub_models.cached_files(hub_id, cache)
        missing = [name for name, path in found.items() if path is None]
        ref = cache / ("models--" + hub_id.replace("/", "--")) / "refs" / "main"
        commit = ref.read_text().strip() if ref.is_file() else None
        models[hub_id] = {"kind": model.kind, "purpose": model.purpose, "size": model.size,
                          "cached": not missing, "missing": missing, "commit": commit,
                          "random_weights": commit == offline_commit(hub_id),
                          "download": hub_models.download_command(hub_id), "gated": model.gated}
    families = {f.name: {"label": f.label, "hub_ids": list(f.hub_ids),
                         "cached": [h for h in f.hub_ids if models.get(h, {}).get("cached")]} for f in FAMILIES.values()}
    return {"versions": {name: package_version(name) for name in PACKAGES},
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "scale": scale, "offline": hub_offline(), "hub_cache": str(cache), "models": models, "families": families}


def format_report(report: dict[str, Any]) -> str:
    """The report of `diagnose()` as text: one line per fact, then what to download next."""
    lines = ["persviz doctor", "", "versions:"]
    lines += [f"  {name:<16} {version or 'not installed'}" for name, version in report["versions"].items()]
    lines += ["", f"device:    {report['device']} ({report['dtype']})",
              f"scale:     {report['scale']} ({SCALE_ENV}=full uses the Hub models below)",
              f"offline:   {'yes (HF_HUB_OFFLINE=1: nothing downloads)' if report['offline'] else 'no (missing models download when used)'}",
              f"hub cache: {report['hub_cache']}", "", "Hub models:"]
    for hub_id, state in report["models"].items():
        mark = "cached " if state["cached"] else "MISSING"
        note = " (persviz's random weights: write_offline_hub_cache)" if state.get("random_weights") else ""
        lines.append(f"  {mark} {hub_id:<44} {state['kind']:<8} {state['size']}{note}")
    lines += ["", "model families:"]
    for name, fam in report.get("families", {}).items():
        lines.append(f"  {name:<6} {fam['label']:<24} {len(fam['cached'])} of {len(fam['hub_ids'])} Hub models cached")
    missing = {hub_id: s for hub_id, s in report["models"].items() if not s["cached"]}
    if missing:
        lines += ["", "to download next (where there is internet; then HF_HUB_OFFLINE=1 works):"]
        for hub_id, state in missing.items():
            gate = (f"; gated: accept its license on https://huggingface.co/{hub_id} and `hf auth login` first"
                    if state.get("gated") else "")
            lines += [f"  # {state['purpose']}, {state['size']}{gate}", f"  {state['download']}"]
    else:
        lines += ["", "every full-scale model is in the cache."]
    return "\n".join(lines)

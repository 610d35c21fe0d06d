"""Prior-preservation images: generated once by the base pipeline, one file per image, cached and checked on reuse."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from persviz import generation
from persviz.families.base import Pipeline
from persviz.images import read_image
from persviz.io import atomic_write, write_json
from persviz.trainers.core import CLASS_MANIFEST, sha256


def class_images(pipe: Pipeline, config: Any, folder: Path, res: int, progress: bool) -> np.ndarray:
    """uint8 [num, res, res, 3]: the prior-preservation images, generated once by the (base) pipeline and cached.

    The settings come from the config: num = num_class_images images of class_prompt, generated with class_steps
    inference steps and guidance class_guidance, class_batch_size at a time. Image i is generated with seed
    class_seed + i (persviz.generation.generate), so it does not depend on the batching nor on an interruption;
    each is written as folder/{i:05d}.png when done, and a later call generates only the missing ones. When all are
    there, folder/manifest.json records the settings and a sha256 of the images, checked on reuse.
    """
    prompt, num, seed = config.class_prompt, config.num_class_images, config.class_seed
    steps, guidance, batch_size = config.class_steps, config.class_guidance, config.class_batch_size
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"prompt": prompt, "num_images": num, "seed": seed, "steps": steps, "guidance": guidance,
                "resolution": res}
    paths = [folder / f"{i:05d}.png" for i in range(num)]
    manifest = folder / CLASS_MANIFEST
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("settings") != settings:
            raise ValueError(f"{folder} holds class images made with {saved.get('settings')}, not {settings}; "
                             f"delete the folder to generate them again")
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        if manifest.is_file():
            raise ValueError(f"{folder} lost class images {missing[:5]}; delete the folder to generate them again")
        old_bar = getattr(pipe, "_progress_bar_config", None)
        pipe.set_progress_bar_config(disable=True)
        bar = tqdm(total=num, initial=num - len(missing), desc=f"class images '{prompt}'", disable=not progress)
        try:
            runs: list[list[int]] = []
            for i in missing:  # runs of consecutive indices, at most batch_size long
                if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < batch_size:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for run in runs:
                imgs = generation.generate(pipe, [prompt] * len(run), seed=seed + run[0], guidance=guidance,
                                           steps=steps, batch_size=len(run), height=res, width=res)
                for i, im in zip(run, imgs):
                    atomic_write(paths[i], lambda tmp, im=im: Image.fromarray(im).save(tmp, format="PNG"))
                bar.update(len(run))
        finally:
            bar.close()
            if old_bar is None:
                pipe.__dict__.pop("_progress_bar_config", None)
            else:
                pipe._progress_bar_config = old_bar
    arrays = np.stack([read_image(p) for p in paths])
    if arrays.shape[1:] != (res, res, 3):
        raise ValueError(f"the class images in {folder} are {arrays.shape[1:3]}, not {res}x{res}; delete the folder")
    digest = sha256(arrays)
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("sha256") != digest:
            raise ValueError(f"the class images in {folder} were changed since they were generated; delete the "
                             f"folder to generate them again")
    else:
        write_json(manifest, {"settings": settings, "sha256": digest})
    return arrays


__all__ = ["class_images"]

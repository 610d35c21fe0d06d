"""Concept folders: a user's concept, its reference images and one run folder per method, described by concept.json.

    my_concept/
        concept.json            placeholder, class word, reference images, the model id, the runs
        images/                 the reference images (copied in by ``persviz train``)
        textual_inversion/      a Textual Inversion run (diffusers learned_embeds snapshots)
        dreambooth/             a DreamBooth-LoRA run (pytorch_lora_weights.safetensors)
        custom_diffusion/       a Custom Diffusion run (K/V weights and the modifier token)
        study/                  what ``persviz study`` writes

``persviz train`` creates and extends the folder; ``persviz study`` and the notebooks (``PERSVIZ_CONCEPT``) read it.
The shipped ShapesWorld concepts are folders of the same format.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persviz.errors import ConceptFolderError  # defined on the floor below; read from here too
from persviz.images import read_image
from persviz.io import PathLike, atomic_folder, write_json
from persviz.methods import get_method

CONCEPT_FILE = "concept.json"
IMAGES_DIR = "images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FORMAT = 1


@dataclass
class Concept:
    """What concept.json holds; `folder` is where it was read from (not stored)."""

    placeholder: str
    class_word: str
    model: str
    images: list[str] = field(default_factory=list)           # paths relative to the folder
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)   # method -> {"folder": ..., "token": ...}
    name: str = ""
    folder: Path | None = None

    def run_dir(self, method: str) -> Path:
        """The run folder of `method`; a ConceptFolderError naming `persviz train` when the concept has none."""
        check_method(method)
        if method not in self.runs:
            raise ConceptFolderError(
                f"the concept in {self.folder} has no {method} run; train one with `persviz train "
                f"{method.replace('_', '-')} --images {self.folder / IMAGES_DIR} --class-word {self.class_word} "
                f"--placeholder '{self.placeholder}' --out {self.folder}`")
        run = Path(self.folder) / self.runs[method]["folder"]
        if not run.exists():
            raise ConceptFolderError(f"the {method} run of {self.folder} is recorded at {run}, which does not exist; "
                                     "put the run back there, or adopt it again from where it is now with "
                                     "`persviz adopt`")
        return run

    def token(self, method: str) -> str:
        """The token a run of `method` learned (DreamBooth: its identifier, e.g. 'sks')."""
        self.run_dir(method)
        return self.runs[method]["token"]

    def reference_images(self) -> np.ndarray:
        """The reference images, uint8 [N, H, W, 3] (all of one size: ``load_images`` checks it)."""
        return load_images([Path(self.folder) / p for p in self.images])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("folder")
        return {"format": FORMAT, **d}


def check_method(method: str) -> str:
    """The registry name of `method` (command-line names and aliases accepted: 'textual-inversion', 'ti');
    an UnknownMethodError (a ValueError) listing the methods otherwise."""
    return get_method(method).name


def image_files(folder: PathLike) -> list[Path]:
    """The image files of a folder (sorted); a ConceptFolderError if it is missing, empty or holds other files."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConceptFolderError(f"the images folder {folder} does not exist; pass --images with a folder of "
                                 "3 to 20 photos of the concept")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise ConceptFolderError(f"{folder} holds files that are not images ({', '.join(others[:5])}); keep only "
                                 f"the concept's photos ({', '.join(IMAGE_SUFFIXES)}) in it")
    if not files:
        raise ConceptFolderError(f"the images folder {folder} is empty; put 3 to 20 photos of the concept in it")
    return files


def load_images(paths: list[Path]) -> np.ndarray:
    """Images as uint8 [N, H, W, 3]; each must open as an image, and all must share one size (a ValueError
    naming the odd one otherwise: the trainers centre-crop and resize, so resize them to one size first)."""
    arrays = [read_image(p) for p in paths]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape
        odd = next(p for p, a in zip(paths, arrays) if a.shape != first)
        raise ConceptFolderError(f"the images have different sizes ({first[1]}x{first[0]} and {odd.name}: "
                                 f"{sorted(sizes)}); crop or resize them to one size")
    return np.stack(arrays)


def read_concept(folder: PathLike) -> Concept:
    """The concept of a folder; a ConceptFolderError naming `persviz train` when concept.json is missing."""
    folder = Path(folder).expanduser().resolve()
    path = folder / CONCEPT_FILE
    if not path.is_file():
        raise ConceptFolderError(f"{folder} is not a concept folder: it has no {CONCEPT_FILE}; create one with "
                                 "`persviz train textual-inversion --images DIR --class-word WORD --placeholder "
                                 f"'<my-concept>' --out {folder}`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConceptFolderError(f"{path} is not valid JSON ({e}); fix it or train the concept again") from None
    check_concept_record(d, path)
    d = dict(d)
    d.pop("format")
    return Concept(**d, folder=folder)


def check_concept_record(d: Any, path: Path) -> None:
    """A ConceptFolderError naming the first field of concept.json that is missing or of the wrong type."""
    def bad(what: str) -> ConceptFolderError:
        return ConceptFolderError(f"{path} is not a persviz concept record: {what}; fix it (see "
                                  "data/shapesworld/concepts/*/concept.json for the format) or train the concept again")
    if not isinstance(d, dict):
        raise bad(f"it holds a JSON {type(d).__name__}, not an object")
    if d.get("format") != FORMAT:
        raise ConceptFolderError(f"{path} has format {d.get('format')!r}; this persviz reads format {FORMAT}")
    missing = [k for k in ("placeholder", "class_word", "model") if not d.get(k)]
    if missing:
        raise ConceptFolderError(f"{path} lacks {', '.join(missing)}")
    unknown = sorted(set(d) - {"format", "placeholder", "class_word", "model", "images", "runs", "name"})
    if unknown:
        raise bad(f"unknown field(s) {unknown}")
    for k in ("placeholder", "class_word", "model", "name"):
        if k in d and not isinstance(d[k], str):
            raise bad(f"'{k}' is a {type(d[k]).__name__}, not a string")
    if not isinstance(d.get("images", []), list) or not all(isinstance(x, str) for x in d.get("images", [])):
        raise bad("'images' is not a list of paths")
    runs = d.get("runs", {})
    if not isinstance(runs, dict):
        raise bad("'runs' is not an object")
    for method, run in runs.items():
        if not isinstance(run, dict) or not isinstance(run.get("folder"), str) or not isinstance(run.get("token"), str):
            raise bad(f"run {method!r} needs a 'folder' and a 'token' (strings)")


def concept_paths(concept: Concept) -> list[dict[str, Any]]:
    """Every path concept.json names, resolved: [{'what', 'recorded', 'resolved', 'inside', 'exists'}]; 'inside'
    tells whether it lies in the concept folder (persviz writes nowhere else; an adopted run outside is read only)."""
    root = Path(concept.folder).resolve()
    items = [(f"image {i + 1}", p) for i, p in enumerate(concept.images)]
    items += [(f"{m} run", r["folder"]) for m, r in concept.runs.items()]
    out = []
    for what, recorded in items:
        resolved = (root / recorded).resolve()
        out.append({"what": what, "recorded": recorded, "resolved": str(resolved), "exists": resolved.exists(),
                    "inside": resolved == root or root in resolved.parents})
    return out


def format_paths(concept: Concept) -> str:
    """concept_paths as lines a person reads: where each recorded path leads, and which are outside the folder."""
    lines = [f"paths recorded in {Path(concept.folder) / CONCEPT_FILE}:"]
    for p in concept_paths(concept):
        where = "inside the folder" if p["inside"] else "OUTSIDE the folder (read only)"
        lines.append(f"  {p['what']}: {p['recorded']} -> {p['resolved']} ({where}"
                     f"{'' if p['exists'] else ', MISSING'})")
    return "\n".join(lines)


def write_concept(concept: Concept) -> Path:
    """concept.json, written atomically into concept.folder."""
    return write_json(Path(concept.folder) / CONCEPT_FILE, concept.to_json())


def prepare_concept(folder: PathLike, images: PathLike, placeholder: str, class_word: str, model: str) -> Concept:
    """The concept of `folder`, checked against the asked placeholder, class word and model, or a new one (not yet
    written: ``adopt_images`` and ``write_concept`` do that once the run can start). Reads every image first."""
    folder = Path(folder).expanduser().resolve()
    files = image_files(images)
    load_images(files)
    if (folder / CONCEPT_FILE).is_file():
        c = read_concept(folder)
        for what, have, asked in (("placeholder", c.placeholder, placeholder), ("class word", c.class_word, class_word),
                                  ("model", c.model, model)):
            if have != asked:
                raise ConceptFolderError(f"the concept in {folder} has {what} {have!r}, not {asked!r}; use the same "
                                         f"{what}, or another --out folder for another concept")
        return c
    if folder.exists() and any(folder.iterdir()):
        raise ConceptFolderError(f"{folder} is not empty and has no {CONCEPT_FILE}; choose a new --out folder")
    return Concept(placeholder=placeholder, class_word=class_word, model=model, name=folder.name, folder=folder,
                   images=[f"{IMAGES_DIR}/{p.name}" for p in files])


def adopt_images(concept: Concept, images: PathLike) -> None:
    """Copy the reference images into the concept's images/ folder (once, atomically)."""
    target = Path(concept.folder) / IMAGES_DIR
    if target.is_dir():
        return

    def copy(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for p in image_files(images):
            shutil.copy2(p, tmp / p.name)
    atomic_folder(target, copy)


__all__ = ["CONCEPT_FILE", "IMAGES_DIR", "Concept", "ConceptFolderError", "adopt_images", "check_concept_record",
           "check_method", "concept_paths", "format_paths",
           "image_files", "load_images", "prepare_concept", "read_concept", "write_concept"]

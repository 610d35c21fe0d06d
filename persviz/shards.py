"""Long grids sharded over processes: each process computes its cells, each cell's result is one file, the main
process gathers them; a killed run resumes with the missing cells only.

    cells = [cell(rotation=r, scale=s) for r in (0, 0.2) for s in (0, 0.5)]      # ids 'rotation0_scale0', ...
    results = run_cells(cells, compute, "out/")   # {id: compute(cell)} on the main process, None on the others

A cell is a small JSON-able dict with a stable, filename-safe ``id``. The processes are Hugging Face accelerate's
(``PartialState``: ``process_index`` / ``num_processes``; unlaunched, one process): process k takes the cells at
positions i with ``i % num_processes == k`` that have no result file yet, computes each and writes it atomically
(``persviz.io.write_json``) as ``folder/cells/<id>.json``; then every process waits for the others and the main
process reads all cell files into one result, in the grid's order. ``folder/manifest.json`` holds the grid and the
settings; a folder that holds another grid is refused (or, with ``on_mismatch='restart'``, the cell files its manifest lists are
deleted, and nothing else).
A cell's result must depend on the cell only (its seeds included), never on its position or its process, so the
sharded result equals the single-process one. More processes than cells: the extra processes compute nothing
(each prints one line saying so) and wait for the others. A process that raises ends the launch (accelerate's
launcher stops the others); the cell files written so far stay, and the same command resumes.

``launched()`` tells whether this process was started by accelerate (or torchrun); ``relaunch(argv, n)`` runs
``python -m accelerate.commands.launch --num_processes n ... -m persviz ARGV`` (on a machine without CUDA the
processes run on the CPU over torch.distributed's gloo backend).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from persviz.io import PathLike, check_write, confined, remove_file, to_jsonable, write_json

FORMAT = "persviz shards 1"
CELLS_DIR = "cells"
MANIFEST = "manifest.json"
LAUNCH_ENV = ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_PROCESS_INDEX")
_ID = re.compile(r"^[A-Za-z0-9._+-]+$")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    return str(v)


def cell(**params: Any) -> dict[str, Any]:
    """A cell of the grid: the params and an id made of them, e.g. cell(rotation=0.2, scale=0.5)['id'] ==
    'rotation0.2_scale0.5', cell(part='tea', method='dreambooth')['id'] == 'tea_dreambooth' (a text value stands for
    itself); stable: the same params always give the same id."""
    cid = "_".join(v if isinstance(v, str) else f"{k}{_fmt(v)}" for k, v in params.items()) or "all"
    return {"id": re.sub(r"[^A-Za-z0-9._+-]", "-", cid), **params}


def check_cells(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The cells as JSON-able dicts; a ValueError for an empty grid, a missing, unsafe or repeated id."""
    if not cells:
        raise ValueError("the grid has no cell")
    out, seen = [], set()
    for c in cells:
        cid = c.get("id") if isinstance(c, Mapping) else None
        if not isinstance(cid, str) or not _ID.match(cid):
            raise ValueError(f"cell {c!r} needs an 'id' of letters, digits and ._+- (it names the cell's file)")
        if cid in seen:
            raise ValueError(f"two cells share the id {cid!r}; each cell needs its own")
        seen.add(cid)
        out.append(to_jsonable(dict(c)))
    return out


def launched() -> bool:
    """Whether this process was started by accelerate's launcher or torchrun (their environment variables are set)."""
    return any(k in os.environ for k in LAUNCH_ENV)


def process_state() -> PartialState:
    """accelerate's PartialState of this process: one process when unlaunched; on the CPU (no CUDA) over gloo."""
    return PartialState(cpu=not torch.cuda.is_available())


def free_port() -> int:
    """A free TCP port on localhost, for the launch's rendezvous (so two launches never share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(argv: Sequence[str], processes: int, module: str = "persviz") -> list[str]:
    """The command that runs ``python -m MODULE ARGV`` in `processes` processes through accelerate's launcher
    (its torchrun launcher; each process then finds gloo on the CPU or NCCL on its GPU)."""
    if processes < 1:
        raise ValueError(f"--processes must be at least 1; got {processes}")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", module, *argv]


def relaunch(argv: Sequence[str], processes: int, threads: Optional[int] = None, module: str = "persviz") -> int:
    """Run ``python -m MODULE ARGV`` in `processes` processes (launch_command), each with `threads` torch threads
    (default: the CPU cores shared out); returns the launch's exit code."""
    env = dict(os.environ)
    n = threads or max(1, (os.cpu_count() or 1) // processes)
    env.setdefault("OMP_NUM_THREADS", str(n))
    env.setdefault("MKL_NUM_THREADS", str(n))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return subprocess.run(launch_command(argv, processes, module), env=env, check=False).returncode


def strip_option(argv: Sequence[str], option: str, takes_value: bool = True) -> list[str]:
    """argv without `option` (and its value): '--processes 2' and '--processes=2' both go."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = takes_value
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def manifest(cells: Sequence[Mapping[str, Any]], settings: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    return {"format": FORMAT, "cells": check_cells(cells), "settings": to_jsonable(dict(settings or {}))}


def cell_path(folder: PathLike, cell_id: str) -> Path:
    return Path(folder) / CELLS_DIR / f"{cell_id}.json"


def done_cells(folder: PathLike, cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ids of the cells whose result file is written."""
    return [c["id"] for c in cells if cell_path(folder, c["id"]).is_file()]


def _check_manifest(folder: Path, want: dict, on_mismatch: str, main: bool) -> None:
    path = folder / MANIFEST
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except json.JSONDecodeError:
            have = None
        if have == want:
            return
        if on_mismatch != "restart":
            raise ValueError(f"the results folder {folder} holds a different grid or settings ({path} differs); "
                             "use a new --out or delete it")
        if main:
            removed = remove_cells(folder, have)
            print(f"{folder} held another grid: its {removed} cell result(s) are deleted and the grid starts over",
                  flush=True)
            write_json(path, want)
    elif main:
        write_json(path, want)


def remove_cells(folder: Path, old_manifest: Any) -> int:
    """Delete the result files of the cells an earlier persviz manifest lists (cells/<id>.json, regular files whose
    content names that cell), and nothing else: other files, links and folders in cells/ stay. Returns the count."""
    cells = old_manifest.get("cells") if isinstance(old_manifest, dict) else None
    ids = [c.get("id") for c in cells if isinstance(c, dict)] if isinstance(cells, list) else []
    removed = 0
    for cid in ids:
        if not isinstance(cid, str) or not _ID.match(cid):
            continue
        f = cell_path(folder, cid)
        if f.is_symlink() or not f.is_file():
            continue
        try:
            ours = json.loads(f.read_text()).get("cell", {}).get("id") == cid
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ours = False
        if ours:
            remove_file(f)
            removed += 1
    return removed


def run_cells(cells: Sequence[Mapping[str, Any]], compute: Callable[[dict], Any], folder: PathLike,
              settings: Optional[Mapping[str, Any]] = None, state: Any = None, progress: bool = True,
              desc: str = "cells", on_mismatch: str = "error") -> Optional[dict[str, Any]]:
    """Compute each cell once, sharded over the processes; {cell id: result} (grid order) on the main process,
    None on the others.

    compute(cell) returns the cell's JSON-able result (to_jsonable applies: NaN becomes None). settings: what else
    the results depend on (model, sampler steps, ...), kept in the manifest with the grid. state: accelerate's
    PartialState (default process_state()); anything with process_index, num_processes, is_main_process and
    wait_for_everyone() will do. on_mismatch: 'error' (a ValueError when the folder holds another grid) or
    'restart' (delete its cells and start over)."""
    if on_mismatch not in ("error", "restart"):
        raise ValueError(f"on_mismatch must be 'error' or 'restart'; got {on_mismatch!r}")
    cells = check_cells(cells)
    with confined(check_write(folder)):
        return _run_cells(cells, compute, Path(folder), settings, state, progress, desc, on_mismatch)


def _run_cells(cells: list[dict], compute: Callable[[dict], Any], folder: Path, settings: Optional[Mapping[str, Any]],
               state: Any, progress: bool, desc: str, on_mismatch: str) -> Optional[dict[str, Any]]:
    state = state if state is not None else process_state()
    rank, n, main = int(state.process_index), int(state.num_processes), bool(state.is_main_process)
    _check_manifest(folder, manifest(cells, settings), on_mismatch, main)
    state.wait_for_everyone()
    mine = [c for i, c in enumerate(cells) if i % n == rank]
    if not mine:
        print(f"process {rank} of {n}: no cell to compute ({len(cells)} cells for {n} processes); it waits for the "
              "others", flush=True)
    todo = [c for c in mine if not cell_path(folder, c["id"]).is_file()]
    if main and len(todo) < len(mine):
        print(f"resuming {folder}: {len(mine) - len(todo)} of this process's {len(mine)} cells are done", flush=True)
    for c in tqdm(todo, desc=f"{desc} (process {rank + 1}/{n})" if n > 1 else desc, disable=not (progress and main)):
        write_json(cell_path(folder, c["id"]), {"cell": c, "result": compute(dict(c))})
    state.wait_for_everyone()
    if not main:
        return None
    return gather(folder, cells)


def gather(folder: PathLike, cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{cell id: result} read from the cell files, in the grid's order; a ValueError naming the cells missing."""
    missing = [c["id"] for c in cells if not cell_path(folder, c["id"]).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(cells)} cells have no result in {Path(folder) / CELLS_DIR} (e.g. "
                         f"{missing[:3]}); run the command again to compute them")
    return {c["id"]: json.loads(cell_path(folder, c["id"]).read_text())["result"] for c in cells}


__all__ = ["CELLS_DIR", "FORMAT", "MANIFEST", "cell", "cell_path", "check_cells", "done_cells", "free_port", "gather",
           "launch_command", "launched", "manifest", "process_state", "relaunch", "remove_cells", "run_cells",
           "strip_option"]

"""The command line the benchmark scripts share: --small first, --model/--device where a pipeline is loaded,
--threads and --seed last; --threads is applied (torch.set_num_threads) when the arguments are parsed."""
from __future__ import annotations

import argparse

import torch


def parser(doc: str, small: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring, with --small ("quick check: {small}")."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help=f"quick check: {small}")
    return ap


def add_model_args(ap: argparse.ArgumentParser, device_help: str = "default: cuda if available, else cpu") -> None:
    """--model (persviz.loading.load_pipeline's name, default 'shapesworld') and --device."""
    ap.add_argument("--model", default="shapesworld", help="'shapesworld' (default), a Hub id or a local folder")
    ap.add_argument("--device", default=None, help=device_help)


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds --threads and --seed, parses the command line and sets torch's thread count if --threads was given."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (timings of CUDA calls are asynchronous); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


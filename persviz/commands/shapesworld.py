"""``persviz shapesworld train | evaluate | concepts``: the embedded world's models and personal concepts."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from persviz.commands.common import doc, threads
from persviz.constants import GUIDANCE, STAGES, TRAIN_SIZE
from persviz.paths import SHAPESWORLD_DIR


def add_parser(sub: Any) -> None:
    """Adds ``shapesworld`` and its actions."""
    world = sub.add_parser("shapesworld", help="train or re-measure the embedded ShapesWorld models").add_subparsers(
        dest="action", required=True)
    train_doc, evaluate_doc = doc("persviz.shapesworld.train"), doc("persviz.shapesworld.evaluate")
    p = world.add_parser("train", help=train_doc.splitlines()[0], description=train_doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--force", action="store_true", help="run stages even if their output exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--train-size", type=int, default=TRAIN_SIZE, help="rendered training images")
    p.add_argument("--oracle-size", type=int, default=60_000, help="rendered images for the oracle")
    p.add_argument("--clip-steps", type=int, default=1200)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-decoder-steps", type=int, default=2500)
    p.add_argument("--oracle-steps", type=int, default=2000)
    p.add_argument("--dino-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=9300)
    p.add_argument("--second-boost-start", type=int, default=6300,
                   help="UNet step from which half of each batch has a second object (and the LR decays)")
    p.add_argument("--offset-noise", type=float, default=0.15, help="strength of offset noise in UNet training")
    p.add_argument("--offset-noise-start", type=int, default=3200, help="UNet step from which offset noise is used")
    p.set_defaults(run=train)

    p = world.add_parser("evaluate", help=evaluate_doc.splitlines()[0], description=evaluate_doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--out", default=str(SHAPESWORLD_DIR / "metrics.json"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(run=evaluate)

    p = world.add_parser("concepts", help="write the personal concepts' reference images and concepts.json")
    p.set_defaults(run=concepts)


def train(a: argparse.Namespace) -> Any:
    """Runs the asked stages (resumable; persviz.shapesworld.train.run_stages)."""
    from persviz.shapesworld import train as world_train
    return world_train.run_stages(a)


def evaluate(a: argparse.Namespace) -> None:
    """Re-measures the models and prints the metrics (written to --out)."""
    from persviz.shapesworld import evaluate as world_evaluate
    threads(a.threads)
    print(json.dumps(world_evaluate.evaluate_all(a.prompts, a.guidance, Path(a.out)), indent=2))


def concepts(a: argparse.Namespace) -> None:
    """Writes the personal concepts' reference images and concepts.json."""
    from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR, write_references
    write_references()
    print(f"wrote {len(CONCEPTS)} concepts to {CONCEPTS_DIR}")

"""``persviz pigeon train | study``: Pigeon's training stages and its comparison table."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from persviz.commands.common import doc, floats, threads
from persviz.constants import REGIMES


def add_parser(sub: Any) -> None:
    """Adds ``pigeon`` and its actions."""
    pg = sub.add_parser("pigeon", help="Pigeon's training stages and comparison table").add_subparsers(
        dest="action", required=True)
    p = pg.add_parser("train", help="train stage 1 (masked reconstruction), stage 2 (DPO) or the baseline",
                      description=doc("persviz.pigeon.train"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("1", "2", "baseline", "perfect"), default="1",
                   help="1, 2, baseline (stage 1's losses, every history token read, no history mask) or perfect "
                        "(stage 1's losses, the history read through the ground truth's mask; token regimes)")
    p.add_argument("--regime", choices=REGIMES, default=None,
                   help="the users' noise: image (whole noise images) or token (distractor tokens in liked images); "
                        "default image, stage 2: the regime of its stage-1 run (--init)")
    p.add_argument("--out", default=None, help="output folder (default data/pigeon/stage{N} or baseline; "
                                                 "with --regime token under data/pigeon/token/)")
    p.add_argument("--init", default=None, help="stage 2: the stage-1 folder (default: stage1 beside --out)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 3e-4 (stage 1), 1e-5 (stage 2)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="stage 1 min-SNR weighting; 0: plain MSE")
    p.add_argument("--aux-weight", type=float, default=0.1, help="stage 1 target-embedding loss weight; 0: off")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-users", type=int, default=1000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--noise-rates", type=floats, default=None,
                   help="e.g. 0,0.2,0.4,0.6 (default: image 0,0.2,0.4,0.6; token 0,0.2,0.4)")
    p.add_argument("--beta", type=float, default=0.1, help="stage 2 DPO beta (diffusers convention)")
    p.add_argument("--n-pairs", type=int, default=2000)
    p.add_argument("--pair-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-out-tokens", type=int, default=None)
    p.add_argument("--condition", choices=("text+tokens", "tokens"), default=None)
    p.add_argument("--eval", type=int, default=0, help="after training: judge N validation windows with the oracle")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="random tiny backbones (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=train)

    p = pg.add_parser("study", help="write the comparison table (default data/pigeon/comparison.json)",
                      description=doc("persviz.pigeon.study", "comparison_table"),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=REGIMES, default=None,
                   help="held-out users' noise: image or token (default: the stage-1 run's; the default folders "
                        "of --regime token lie under data/pigeon/token/)")
    p.add_argument("--stage1", default=None, help="default data/pigeon/stage1 (token: data/pigeon/token/stage1)")
    p.add_argument("--stage2", default=None, help="default beside stage1's default; 'none' leaves the row out")
    p.add_argument("--baseline", default=None,
                   help="the trained baseline's folder (default: none; token: data/pigeon/token/baseline); 'none' "
                        "leaves the row out")
    p.add_argument("--n-windows", type=int, default=50)
    p.add_argument("--noise-rates", default="0,0.2,0.4",
                   help="comma-separated; image: multiples of 0.2, token: shares of distractor tokens up to 0.5")
    p.add_argument("--split", default="test")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="default data/pigeon/comparison.json (token: "
                                                 "data/pigeon/token/comparison.json)")
    p.set_defaults(run=study)

    p = pg.add_parser("control", help="the perfect-mask control: perfect mask, trained baseline and learned mask "
                                      "on held-out users (default data/pigeon/<regime>/control.json)",
                      description=doc("persviz.pigeon.control"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=("token", "decoy"), default="token",
                   help="held-out users' noise (the runs' defaults lie under data/pigeon/<regime>/)")
    p.add_argument("--perfect", default=None, help="the perfect-mask run (default data/pigeon/<regime>/perfect)")
    p.add_argument("--baseline", default=None, help="the trained baseline (default data/pigeon/<regime>/baseline)")
    p.add_argument("--stage1", default=None, help="Pigeon's stage 1 (default data/pigeon/<regime>/stage1)")
    p.add_argument("--rows", default=None, help="comma-separated row keys (default: every row; see CONTROL_ROWS)")
    p.add_argument("--n-windows", type=int, default=96)
    p.add_argument("--noise-rates", default="0.2,0.4", help="comma-separated shares of distractor tokens")
    p.add_argument("--split", default="test")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="default data/pigeon/<regime>/control.json")
    p.set_defaults(run=control)


def _pigeon_pipeline(a: argparse.Namespace, stage: int, init: str | None) -> tuple[Any, str]:
    """The pipeline a training run starts from: the ShapesWorld backbone, or random tiny ones with --tiny."""
    from persviz.pigeon.model import PigeonPipeline, build_model, read_config, tiny_pipeline
    overrides = {k: v for k, v in (("d_model", a.d_model), ("n_layers", a.n_layers),
                                   ("n_out_tokens", a.n_out_tokens), ("condition", a.condition)) if v is not None}
    config = read_config(init) if stage == 2 else None
    if stage == 2 and overrides:
        raise SystemExit("stage 2 takes the model settings of its stage-1 run; drop --d-model/--n-layers/...")
    if a.tiny:  # the frozen tiny parts are always seed 0; --seed sets the trainable modules' init
        pipe = tiny_pipeline(config, seed=0, **({"d_model": 32} | overrides) if config is None else {})
        if stage == 1:
            fresh = build_model(pipe.scorer.model, pipe.scorer.tokenizer, pipe.model.config.cross_attention_dim,
                                pipe.model.prompt_encoder, pipe.model.config, seed=a.seed)
            pipe.model.load_trainable_state_dict(fresh.trainable_state_dict())
        return pipe, "tiny"
    return PigeonPipeline.from_shapesworld(config=config, device=a.device, seed=a.seed, **overrides), "shapesworld"


def _pigeon_root(regime: str | None) -> Path:
    """Where a regime's runs and table go by default: data/pigeon (image regime), data/pigeon/token."""
    from persviz.pigeon import train as pigeon_train
    return pigeon_train.OUT_DIR / regime if regime in ("token", "decoy") else pigeon_train.OUT_DIR


def train(a: argparse.Namespace) -> Any:
    """Trains one stage (resumable); with --eval judges validation windows with the oracle. Returns the TrainResult."""
    from persviz.io import write_json
    from persviz.loading import load_evaluator
    from persviz.pigeon import study as pigeon_study
    from persviz.pigeon import train as pigeon_train
    from persviz.pigeon.users import make_datasets
    threads(a.threads)
    stage = 2 if a.stage == "2" else 1
    root = _pigeon_root(a.regime)
    out = Path(a.out) if a.out else root / (a.stage if a.stage in ("baseline", "perfect") else f"stage{stage}")
    init = None
    regime = a.regime or "image"
    if stage == 2:
        init = a.init or str((Path(a.out).parent if a.out else root) / "stage1")
        regime = a.regime or pigeon_study.training_regime(init)
    config = pigeon_train.TrainConfig(
        stage=stage, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
        snr_gamma=a.snr_gamma or None, aux_weight=a.aux_weight, save_every=a.save_every, seed=a.seed,
        n_users=a.n_users, data_seed=a.data_seed, noise_rates=a.noise_rates, init_from=init, beta=a.beta,
        n_pairs=a.n_pairs, pair_steps=a.pair_steps, guidance_scale=a.guidance_scale, regime=regime,
        history_mask=a.stage != "baseline", perfect_mask=a.stage == "perfect")
    pipe, backbone = _pigeon_pipeline(a, stage, init)
    result = pigeon_train.train(pipe, config, out, progress=not a.no_progress, backbone=backbone)
    last = result.losses[-1] if result.losses else float("nan")
    print(f"stage {a.stage}: {result.steps} steps, last loss {last:.4f}; weights in {result.final_path}")
    if a.eval > 0:
        val = make_datasets(config.n_users, config.data_seed, config.noise_rates, config.n_interactions,
                            regime=config.regime)["val"]
        report = pigeon_train.evaluate(pipe, val, a.eval, load_evaluator(kind="oracle"))
        print(json.dumps(report, indent=1))
        write_json(out / "eval.json", report)
    return result


def study(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Writes the comparison table and prints it with its paired differences."""
    from persviz.pigeon import study as pigeon_study
    threads(a.threads)
    root = _pigeon_root(a.regime)
    stage1 = a.stage1 or str(root / "stage1")
    stage2 = a.stage2 or str(root / "stage2")
    baseline = a.baseline or (str(root / "baseline") if a.regime in ("token", "decoy") else "none")
    out = a.out or str(root / "comparison.json")
    extra = {k: v for k, v in (("regime", a.regime),
                               ("baseline", None if baseline.lower() == "none" else baseline)) if v is not None}
    rows = pigeon_study.comparison_table(
        stage1, None if stage2.lower() == "none" else stage2, a.n_windows, floats(a.noise_rates), a.split,
        seed=a.seed, batch_size=a.batch_size, num_inference_steps=a.steps, path=out, **extra)
    print(pigeon_study.format_table(rows))
    print(pigeon_study.format_differences(rows))
    if any(f"vs_{pigeon_study.TRAINED_BASELINE}" in r for r in rows):
        print(pigeon_study.format_differences(rows, against=pigeon_study.TRAINED_BASELINE))
    if any("masks" in r for r in rows):
        print(pigeon_study.format_mask_measures(rows))
    print(f"written to {out}")
    return rows


def control(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Writes the perfect-mask control's table and prints it with its paired differences."""
    from persviz.pigeon import control as pigeon_control
    threads(a.threads)
    root = _pigeon_root(a.regime)
    models = {"perfect": a.perfect or str(root / "perfect"), "baseline": a.baseline or str(root / "baseline"),
              "stage1": a.stage1 or str(root / "stage1")}
    out = a.out or str(root / "control.json")
    rows = pigeon_control.control_table(
        models, a.n_windows, floats(a.noise_rates), regime=a.regime,
        rows=None if a.rows is None else [r.strip() for r in a.rows.split(",") if r.strip()], split=a.split,
        seed=a.seed, batch_size=a.batch_size, num_inference_steps=a.steps, path=out)
    print(pigeon_control.format_control(rows))
    print(f"written to {out}")
    return rows

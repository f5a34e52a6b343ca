"""Command line: argument parsing only; each verb calls one library function."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from .config import DEFAULT_RECIPE, RECIPES, SCHEDULES, TrainConfig, recipe_config
from .errors import UserError

# Options that map one-to-one onto TrainConfig fields; None means "not given".
TRAIN_FIELDS = (
    "model", "epochs", "batch_size", "micro_batch", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
    "warmup_epochs", "label_smoothing", "crop_padding", "crop_mode", "flip", "alternate_flip", "cutout", "seed",
    "split_seed", "val_size", "subset", "patience", "tta", "device", "amp",
)  # fmt: skip
# Options that may differ on --resume without changing what the run computes.
RESUME_FREE = ("device",)


def build_parser() -> argparse.ArgumentParser:
    from .models import list_models

    parser = argparse.ArgumentParser(prog="cifar10", description=__doc__.splitlines()[0].rstrip(".") + ".")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser(
        "train", help="train a model and write a run directory with metrics, plots and a report"
    )
    t.add_argument("--recipe", help=f"named recipe: {', '.join(sorted(RECIPES))} (default {DEFAULT_RECIPE})")
    t.add_argument(
        "--config", type=Path, help="a saved config.json to start from (e.g. runs/<run>/config.json)"
    )
    t.add_argument("--model", help=f"architecture: {', '.join(list_models())}")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--micro-batch", type=int, help="accumulate each batch from micro-batches of this size")
    t.add_argument(
        "--optimizer", choices=("sgd", "muon"), help="sgd, or muon (Muon on conv filters, SGD on the rest)"
    )
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--momentum", type=float)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=SCHEDULES)
    t.add_argument("--warmup-epochs", type=float, help="linear warm-up length (fractions allowed)")
    t.add_argument("--label-smoothing", type=float)
    t.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (0: no crop)")
    t.add_argument("--crop-mode", choices=("zeros", "reflect"), help="padding of the random crop")
    t.add_argument(
        "--alternate-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip each image on alternate epochs instead of at random",
    )
    t.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flip"
    )
    t.add_argument("--cutout", type=int, help="cutout square size in pixels (0: off)")
    t.add_argument("--seed", type=int)
    t.add_argument("--split-seed", type=int, help="seed of the validation split (default 0)")
    t.add_argument("--val-size", type=int, help="images held out for validation (default 5000; 0 allowed)")
    t.add_argument("--subset", type=int, help="train on the first N training images only")
    t.add_argument("--patience", type=int, help="stop after N epochs without a better validation accuracy")
    t.add_argument(
        "--tta",
        type=int,
        nargs="?",
        const=1,
        choices=(0, 1, 2),
        help="test-time augmentation of the final test: 1 mirror, 2 mirror + shifts (--tta alone: 1)",
    )
    t.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    t.add_argument(
        "--amp", choices=("auto", "off", "fp16", "bf16"), help="mixed precision (auto: on for CUDA)"
    )
    t.add_argument("--data-dir", help="where CIFAR-10 is or goes (default $CIFAR10_DATA, else ./data)")
    t.add_argument("--allow-unverified", action="store_true", help="use data that fails the sha256 check")
    t.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>-<recipe>)")
    t.add_argument("--force", action="store_true", help="replace the run already in --out")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run exactly where it stopped")
    t.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    t.add_argument("--seeds", type=int, help="N runs with seeds seed..seed+N-1, and a summary (mean ± std)")

    e = sub.add_parser("evaluate", help="test-set metrics and plots for a finished run")
    e.add_argument("run", type=Path, help="a run directory")
    e.add_argument("--data-dir")
    e.add_argument("--allow-unverified", action="store_true")
    e.add_argument(
        "--tta",
        type=int,
        nargs="?",
        const=1,
        default=0,
        choices=(0, 1, 2),
        help="test-time augmentation: 1 mirror, 2 mirror + 1-pixel shifts",
    )
    e.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe (or --config file, or the resumed run's config) with the options given on the command line."""
    given = {name: getattr(args, name) for name in TRAIN_FIELDS if getattr(args, name) is not None}
    if args.resume is not None:
        if args.recipe or args.config:
            raise UserError(
                "--resume continues a run with its own config; do not combine it with --recipe/--config"
            )
        saved = TrainConfig.load(args.resume / "config.json") if args.resume.is_dir() else None
        if saved is None:
            raise UserError(f"--resume {args.resume}: not a run directory (no config.json)")
        conflicts = [
            f"--{k.replace('_', '-')} {v} (run has {getattr(saved, k)})"
            for k, v in given.items()
            if k not in RESUME_FREE and v != getattr(saved, k)
        ]
        if conflicts:
            raise UserError(
                f"--resume {args.resume} conflicts with {', '.join(conflicts)}; drop those options"
            )
        return TrainConfig(**{**saved.to_dict(), **given})
    if args.config is not None:
        if args.recipe:
            raise UserError("give either --recipe or --config, not both")
        return TrainConfig(**{**TrainConfig.load(args.config).to_dict(), **given})
    return recipe_config(args.recipe or DEFAULT_RECIPE, **given)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train, train_seeds

    cfg = config_from_args(args)
    common = dict(
        data_dir=args.data_dir,
        allow_unverified=args.allow_unverified,
        force=args.force,
        progress=not args.no_progress,
    )
    if args.seeds is not None:
        if args.resume is not None or args.seeds < 1:
            raise UserError("--seeds takes a number of runs (1 or more) and cannot be combined with --resume")
        train_seeds(cfg, args.seeds, out=args.out, **common)
    else:
        train(cfg, out=args.out, resume=args.resume, **common)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, weights_path
    from .data import load_cifar10, to_split
    from .evaluate import evaluate_run

    model, _ = load_model(weights_path(args.run))  # fail on a bad run before loading data
    if not args.run.is_dir():
        raise UserError(f"{args.run} is not a run directory")
    data = load_cifar10(args.data_dir, allow_unverified=args.allow_unverified, progress=not args.no_progress)
    evaluate_run(args.run, to_split(data.test_images, data.test_labels), tta=args.tta, model=model)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a run continues with: cifar10 train --resume <run dir>", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(
                f"error: no space left on device{where}; free some space, then continue with --resume",
                file=sys.stderr,
            )
            return 1
        raise

"""Command line: argument parsing only; each verb calls one library function.

Nothing heavy is imported here: each verb imports its module when it runs, so `cifar10 --help` and
`cifar10 predict` load neither the training code nor matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import typing
from pathlib import Path

from .config import DEFAULT_RECIPE, RECIPES, TrainConfig, recipe_config, with_options
from .errors import UserError

DESCRIPTION = "Train, evaluate, explain and serve convolutional image classifiers for CIFAR-10."
# The TrainConfig fields that are command-line options (their metadata says how), in declaration order.
CONFIG_OPTIONS = tuple(f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli"))
# The options of `evaluate` that are TrainConfig's too (declared there, once).
TTA_OPTIONS = tuple(f for f in CONFIG_OPTIONS if f.name in ("tta", "tta_margin"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar10", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_tune_parser(sub)
    r = sub.add_parser("report", help="rebuild a run's report.html; several runs are compared side by side")
    r.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories (or a --seeds output)")
    r.add_argument("--out", type=Path, help="the comparison page of several runs (default: beside the runs)")
    add_use_parsers(sub)
    add_explain_parser(sub)
    return parser


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where CIFAR-10 is or goes (default $CIFAR10_DATA, else ./data)")
    p.add_argument("--allow-unverified", action="store_true", help="use data that fails the sha256 check")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train a model and write a run directory with metrics, plots and a report"
    )
    add_config_options(t)
    add_data_options(t)
    t.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>-<recipe>)")
    t.add_argument("--force", action="store_true", help="replace the run of ours already in --out")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run exactly where it stopped")
    t.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    t.add_argument("--seeds", type=int, help="N runs with seeds seed..seed+N-1, and a summary (mean ± std)")
    t.add_argument("--cv", type=int, metavar="K", help="K-fold cross-validation: a run per stratified fold")


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate", help="test metrics, calibration, robustness, plots and report of a run or weights file"
    )
    e.add_argument("run", type=Path, metavar="RUN_OR_WEIGHTS", help="a run directory or a .safetensors file")
    add_data_options(e)
    e.add_argument(
        "--corruptions", action="store_true", help="add the robustness suite: 10 corruptions x 5 severities"
    )
    e.add_argument(
        "--corruption-images", type=int, metavar="N", help="run the robustness suite on N test images"
    )
    e.add_argument(
        "--out", type=Path, help="output directory for a weights file (default <name>-eval/ beside it)"
    )
    for f in TTA_OPTIONS:
        add_field_option(e, f, default=f.default)
    e.add_argument("--no-progress", action="store_true")


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("tune", help="hyperparameter search with Optuna (TPE, random or grid), or its report")
    add_config_options(u)
    u.add_argument(
        "--trials", type=int, help="finished trials the study should reach (default 20; grid: its size)"
    )
    u.add_argument(
        "--sampler", choices=("tpe", "random", "grid"), help="tpe (default; grid when --grid is given)"
    )
    u.add_argument(
        "--grid", nargs="+", metavar="NAME=A,B", help="grid search over these values, e.g. lr=0.01,0.1"
    )
    u.add_argument("--space", nargs="+", metavar="NAME=LOW:HIGH",
                   help="replace or add ranges: lr=log:1e-3:0.1 epochs=int:4:12")  # fmt: skip
    u.add_argument("--storage", default="sqlite:///tune.db", help="Optuna storage URL (sqlite:///tune.db)")
    u.add_argument("--study", help="study name (default: the recipe's name)")
    u.add_argument("--out", type=Path, help="folder of the trials' run directories (default tune/<study>)")
    u.add_argument("--cv", type=int, metavar="K", help="score each trial by K-fold cross-validation")
    u.add_argument("--no-prune", action="store_true", help="never stop unpromising trials early")
    u.add_argument("--report", action="store_true", help="table of trials, best config file and plots")
    u.add_argument("--best-config", type=Path, default=Path("tune-best.json"), help="(tune-best.json)")
    add_data_options(u)


def add_config_options(p: argparse.ArgumentParser) -> None:
    """--recipe/--config, and an option for every TrainConfig field marked cli (from its metadata)."""
    p.add_argument("--recipe", help=f"named recipe: {', '.join(sorted(RECIPES))} (default {DEFAULT_RECIPE})")
    p.add_argument(
        "--config", type=Path, help="a saved config.json to start from (e.g. runs/<run>/config.json)"
    )
    for f in CONFIG_OPTIONS:
        add_field_option(p, f)


def add_field_option(p: argparse.ArgumentParser, f: dataclasses.Field, default: typing.Any = None) -> None:
    """The option of a TrainConfig field, from its metadata (default None: "not given", the config decides)."""
    flag, meta, kind = f"--{f.name.replace('_', '-')}", f.metadata, typing.get_type_hints(TrainConfig)[f.name]
    if kind is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        return
    number = int if kind in (int, int | None) else float if kind is float else str
    extra = {"nargs": "?", "const": meta["const"]} if "const" in meta else {}
    p.add_argument(flag, type=number, choices=meta["choices"], default=default, help=meta["help"], **extra)


def add_use_parsers(sub: argparse._SubParsersAction) -> None:
    """The verbs that use a trained model: predict, export, serve."""
    model_help = "a run directory, a .safetensors file or an .onnx file"
    backend_help = "torch, or onnx (ONNX Runtime); auto: onnx for .onnx files, else torch"
    p = sub.add_parser("predict", help="top-k classes of image files and folders")
    p.add_argument("model", type=Path, help=model_help)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files and folders (walked recursively)")
    p.add_argument("--top-k", type=int, default=3, help="classes per image (3)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json", help="JSON instead of a table")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv", help="CSV instead of a table")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto", help=backend_help)
    p.add_argument("--batch-size", type=int, default=256, help="images per model call (256)")

    x = sub.add_parser("export", help="export a model as safetensors, ONNX or TorchScript, verified")
    x.add_argument("model", type=Path, help="a run directory or a .safetensors file")
    x.add_argument("--format", choices=("safetensors", "onnx", "torchscript"), default="safetensors")
    x.add_argument("--out", type=Path, help="the file to write (default ./<run name>.<format extension>)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.add_argument("--data-dir", help="CIFAR-10, for the verification on real test images")

    s = sub.add_parser("serve", help="a web service and page for a model (FastAPI + uvicorn)")
    s.add_argument("model", type=Path, help=model_help)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto", help=backend_help)
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest file accepted (10)")
    s.add_argument("--max-files", type=int, default=16, help="most files in one request (16)")
    s.add_argument("--top-k", type=int, default=5, help="classes per image unless a request asks (5)")
    s.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="open connections and requests in progress at once; beyond: 503 (64)")  # fmt: skip
    s.add_argument("--data-dir", help="CIFAR-10, to verify the in-memory ONNX conversion of --backend onnx")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--no-access-log", action="store_true", help="no JSON log line per request")


def add_explain_parser(sub: argparse._SubParsersAction) -> None:
    """The explain verb: heatmaps of where in each image the evidence for a class is."""
    x = sub.add_parser("explain", help="heatmaps of where the evidence is (Grad-CAM or Integrated Gradients)")
    x.add_argument("model", type=Path, metavar="RUN", help="a run directory or a .safetensors file")
    x.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files and folders (walked recursively)")
    x.add_argument("--method", choices=("gradcam", "ig"), default="gradcam", help="gradcam (default) or ig")
    x.add_argument(
        "--target", metavar="CLASS", help="explain this class (name or index) instead of the top ones"
    )
    x.add_argument("--top", type=int, default=3, metavar="K", help="maps for the K most probable classes (3)")
    x.add_argument("--out", type=Path, metavar="DIR", help="a new or empty folder (default ./explain-<time>)")


def given_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (None means "not given")."""
    return {f.name: getattr(args, f.name) for f in CONFIG_OPTIONS if getattr(args, f.name) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe (or --config file, or the resumed run's config) with the options given on the command line.

    For --resume, the library (train.resumed_config) refuses options that differ from the run's own.
    """
    given = given_options(args)
    if getattr(args, "resume", None) is not None:
        from .runs import open_run

        if args.recipe or args.config:
            raise UserError(
                "--resume continues a run with its own config; do not combine it with --recipe/--config"
            )
        return TrainConfig(**{**open_run(args.resume).read_config().to_dict(), **given})
    if args.config is not None:
        if args.recipe:
            raise UserError("give either --recipe or --config, not both")
        return with_options(TrainConfig.load(args.config).to_dict(), given)
    return recipe_config(args.recipe or DEFAULT_RECIPE, **given)


def cmd_train(args: argparse.Namespace) -> int:
    from .device import select_device
    from .distributed import launched
    from .pipeline import train, train_cv, train_seeds

    cfg = config_from_args(args)
    common = dict(
        data_dir=args.data_dir,
        allow_unverified=args.allow_unverified,
        force=args.force,
        progress=not args.no_progress,
    )
    if (args.seeds is not None or args.cv is not None) and args.resume is not None:
        raise UserError("--seeds and --cv start new runs; they cannot be combined with --resume")
    if args.seeds is not None and args.cv is not None:
        raise UserError("give either --seeds or --cv, not both")
    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds takes a number of runs (1 or more)")
    with launched(select_device(cfg.device)):  # joins torchrun's process group, if any
        if args.seeds is not None:
            train_seeds(cfg, args.seeds, out=args.out, **common)
        elif args.cv is not None:
            train_cv(cfg, args.cv, out=args.out, **common)
        else:
            train(cfg, out=args.out, resume=args.resume, **common)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tune

    if args.report:
        tune.report(
            args.storage,
            args.study or args.recipe or DEFAULT_RECIPE,
            out=args.out,
            best_config=args.best_config,
        )
        return 0
    cfg = config_from_args(args)
    grid = tune.parse_grid(args.grid) if args.grid else None
    tune.tune(
        cfg,
        fixed=given_options(args),
        trials=args.trials,
        sampler=args.sampler or ("grid" if grid else "tpe"),
        grid=grid,
        space=tune.parse_space(args.space) if args.space else None,
        storage=args.storage,
        study_name=args.study,
        out=args.out,
        cv=args.cv,
        prune=not args.no_prune,
        data_dir=args.data_dir,
        allow_unverified=args.allow_unverified,
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalOptions
    from .pipeline import evaluate

    options = EvalOptions(
        tta=args.tta,
        tta_margin=args.tta_margin,
        corruptions=args.corruptions or args.corruption_images is not None,
        corruption_images=args.corruption_images,
    )
    evaluate(
        args.run,
        options,
        data_dir=args.data_dir,
        allow_unverified=args.allow_unverified,
        out=args.out,
        progress=not args.no_progress,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_reports

    for path in write_reports(args.runs, out=args.out):
        print(path)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_command

    return predict_command(
        args.model,
        args.inputs,
        k=args.top_k,
        fmt=args.fmt or "table",
        backend=args.backend,
        batch_size=args.batch_size,
        out=sys.stdout,
        err=sys.stderr,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_command

    return export_command(args.model, args.out, args.format, data_dir=args.data_dir, force=args.force)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        backend=args.backend,
        max_upload_mb=args.max_upload_mb,
        max_files=args.max_files,
        top_k_default=args.top_k,
        max_connections=args.max_connections,
        data_dir=args.data_dir,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_command

    return explain_command(
        args.model, args.inputs, method=args.method, target=args.target, top=args.top, out=args.out
    )


COMMANDS = {
    "train": cmd_train,
    "tune": cmd_tune,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "predict": cmd_predict,
    "export": cmd_export,
    "serve": cmd_serve,
    "explain": cmd_explain,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {
            "train": "a run continues with: cifar10 train --resume <run dir>",
            "tune": "the study is intact; the same command continues it",
        }.get(args.verb, "nothing was left half-written")
        print(f"interrupted; {hint}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            then = "continue with --resume" if args.verb == "train" else "run the command again"
            print(f"error: no space left on device{where}; free some space, then {then}", file=sys.stderr)
            return 1
        raise

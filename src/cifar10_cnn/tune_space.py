"""What a study searches: parameters (ranges or choices), each recipe's default space, and --grid/--space parsing."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .config import TrainConfig
from .errors import UserError


@dataclass(frozen=True)
class Param:
    """One searched option: a float or int range (optionally log-scaled), or a list of choices."""

    kind: str  # float, int or choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return ",".join(str(c) for c in self.choices)
        return f"{'log:' if self.log else ''}{'int:' if self.kind == 'int' else ''}{self.low:g}:{self.high:g}"


def default_space(cfg: TrainConfig) -> dict[str, Param]:
    """The search space of a recipe, centred on its own values: the one place where spaces are declared."""
    space = {
        "lr": Param("float", cfg.lr / 10, cfg.lr * 10, log=True),
        "momentum": Param("float", 0.8, 0.98),
        "weight_decay": (
            Param("float", cfg.weight_decay / 10, cfg.weight_decay * 10, log=True)
            if cfg.weight_decay > 0
            else Param("float", 1e-6, 1e-2, log=True)
        ),
        "batch_size": Param("choice", choices=(cfg.batch_size // 2, cfg.batch_size, cfg.batch_size * 2)),
        "label_smoothing": Param("float", 0.0, 0.3),
        "epochs": Param("int", max(1, cfg.epochs // 2), max(2, cfg.epochs * 3 // 2)),
        "crop_padding": Param("int", 0, 4),  # augmentation strength
        "cutout": Param("int", 0, 12),
    }
    if cfg.model in ("airbench", "airbench_small"):  # the width of the fast net: two sizes
        space["model"] = Param("choice", choices=("airbench_small", "airbench"))
    return space


def _typed(name: str, text: str, flag: str) -> Any:
    """A command-line value as the type of the TrainConfig field it sets ('none' for optional fields)."""
    default = getattr(TrainConfig(), name)
    text = text.strip()
    try:
        if default is None or name in ("micro_batch", "val_size", "subset", "patience"):
            return None if text.lower() == "none" else int(text)
        if isinstance(default, bool):
            return {"true": True, "false": False, "on": True, "off": False}[text.lower()]
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except (ValueError, KeyError):
        kind = "true or false" if isinstance(default, bool) else type(default or 0).__name__
        raise UserError(f"{flag} {name}={text}: {name} takes {kind}") from None


def _field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)} - {"recipe"}  # the recipe chooses the base, it is not tuned


def _split(item: str, flag: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not value:
        raise UserError(f"{flag} takes NAME=VALUES items, e.g. lr=0.01,0.1; got {item!r}")
    if name not in _field_names():
        raise UserError(f"{flag}: unknown parameter {name!r}; known: {', '.join(sorted(_field_names()))}")
    return name, value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`lr=0.01,0.03 batch_size=64,128` -> {"lr": [0.01, 0.03], "batch_size": [64, 128]}."""
    grid = {}
    for item in items:
        name, values = _split(item, "--grid")
        grid[name] = [_typed(name, v, "--grid") for v in values.split(",")]
    return grid


def parse_space(items: list[str]) -> dict[str, Param]:
    """`lr=log:0.001:0.1 epochs=int:4:12 momentum=0.8:0.99 batch_size=64,128` -> Params."""
    space = {}
    for item in items:
        name, value = _split(item, "--space")
        parts = value.split(":")
        log = parts[0] == "log"
        parts = parts[1:] if log else parts
        default = getattr(TrainConfig(), name)
        integral = default is None or (isinstance(default, int) and not isinstance(default, bool))
        kind = "int" if integral else "float"
        if parts[0] == "int":
            kind, parts = "int", parts[1:]
        try:
            if len(parts) == 2:
                low, high = float(parts[0]), float(parts[1])
                if not low < high or (log and low <= 0):
                    raise ValueError
                space[name] = Param(kind, low, high, log=log)
            elif len(parts) == 1 and not log:
                space[name] = Param(
                    "choice", choices=tuple(_typed(name, v, "--space") for v in parts[0].split(","))
                )
            else:
                raise ValueError
        except ValueError:
            raise UserError(
                f"--space {item!r}: write NAME=LOW:HIGH, NAME=log:LOW:HIGH, NAME=int:LOW:HIGH or NAME=A,B,C"
            ) from None
    return space


def searched_space(
    base: TrainConfig,
    fixed: dict[str, Any],
    grid: dict[str, list[Any]] | None,
    space: dict[str, Param] | None,
    sampler: str,
) -> dict[str, Param]:
    """The parameters a study searches: the grid, or the recipe's space with --space, less the fixed ones."""
    if grid:
        searched: dict[str, Param] = {k: Param("choice", choices=tuple(v)) for k, v in grid.items()}
    else:
        searched = {**default_space(base), **(space or {})}
    for name in fixed:
        if name in searched and not (grid and name in grid) and not (space and name in space):
            del searched[name]  # given on the command line: fixed
    clash = sorted(set(searched) & set(fixed))
    if clash:
        raise UserError(f"{', '.join(clash)} cannot be both fixed and searched")
    if not searched:
        raise UserError("nothing to search: every parameter of the space is fixed")
    if sampler == "grid" and not grid:
        raise UserError("--sampler grid needs --grid NAME=A,B ...")
    if sampler not in ("tpe", "random", "grid"):
        raise UserError(f"unknown sampler {sampler!r}; choose tpe, random or grid")
    return searched

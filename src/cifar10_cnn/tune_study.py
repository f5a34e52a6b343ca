"""A study in a storage: Optuna itself, loading or creating a study, the space it keeps, its trials' folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .errors import UserError


def require_optuna() -> None:
    """Optuna, or one clear error; its notices about experimental features (heartbeats, plots) are muted."""
    try:
        import optuna
    except ImportError:
        raise UserError("cifar10 tune needs Optuna: python -m pip install -e '.[tune]'") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def load_study(storage: Any, name: str, *, create: bool, sampler: Any = None, pruner: Any = None) -> Any:
    import optuna

    if create:
        return optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(
            f"no study {name!r} in this storage; studies there: {', '.join(known[:20]) or 'none'}"
        ) from None


def check_space(study: Any, description: dict[str, Any]) -> None:
    """A study keeps the space it was created with; another space would mix incomparable trials."""
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", description)
        return
    saved = saved if isinstance(saved, dict) else {}
    if saved != json.loads(json.dumps(description)):
        changed = sorted(k for k in set(saved) | set(description) if saved.get(k) != description.get(k))
        raise UserError(
            f"study {study.study_name!r} was created with another search space (differs in {', '.join(changed)}); "
            "use a new --study name, or the same options as before"
        )


def default_out(study_name: str) -> Path:
    """tune/<study>: the study name must then be a plain folder name, so that it cannot point elsewhere."""
    if study_name in (".", "..") or "/" in study_name or "\\" in study_name or "\0" in study_name:
        raise UserError(f"--study {study_name!r} cannot name a folder; give --out for its trials")
    return Path("tune") / study_name


def finished_states() -> tuple[Any, ...]:
    import optuna

    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def completed(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

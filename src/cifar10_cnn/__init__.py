"""cifar10-cnn: train, evaluate, explain and serve convolutional image classifiers for CIFAR-10.

The package is lazy (PEP 562): `import cifar10_cnn` loads nothing heavy, and each name below imports its
module on first use, so `cifar10 --help` and `cifar10 predict` never load the training code or matplotlib.
"""

from __future__ import annotations

from .lazy import lazy_exports
from .version import __version__ as __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "CLASSES": "constants",
    "load_cifar10": "sources",
    "load_dataset": "sources",
    "make_splits": "data",
    "RECIPES": "config",
    "TrainConfig": "config",
    "recipe_config": "config",
    "count_params": "models",
    "create_model": "models",
    "list_models": "models",
    "load_model": "weights",
    "evaluate_logits": "inference",
    "classification_metrics": "metrics",
    "evaluate_into_run": "eval_job",
    "evaluate_saved": "eval_job",
    "fit": "train",
    "train": "pipeline",
    "train_step": "train",
    "train_seeds": "pipeline",
    "train_cv": "pipeline",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

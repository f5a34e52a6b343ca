"""cifar10-cnn: train, evaluate, explain and serve convolutional image classifiers for CIFAR-10."""

from .config import RECIPES, TrainConfig, recipe_config
from .data import CLASSES, load_cifar10, make_splits
from .evaluate import evaluate_into_run
from .inference import evaluate_logits
from .metrics import classification_metrics
from .models import count_params, create_model, list_models
from .train import fit, train, train_cv, train_seeds
from .weights import load_model

__version__ = "0.1.0"
__all__ = [
    "CLASSES",
    "RECIPES",
    "TrainConfig",
    "classification_metrics",
    "count_params",
    "create_model",
    "evaluate_into_run",
    "evaluate_logits",
    "fit",
    "list_models",
    "load_cifar10",
    "load_model",
    "make_splits",
    "recipe_config",
    "train",
    "train_cv",
    "train_seeds",
]

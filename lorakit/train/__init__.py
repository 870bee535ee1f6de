"""Training: `TrainConfig`, the model-agnostic loop `train`, and `run_training` (what `lorakit
train` runs: load, inject, train, evaluate, save, plot)."""

from .config import TrainConfig, load_yaml, resolve_config
from .loop import batch_plan, loss_sum, train
from .run import RunSummary, run_training

__all__ = [
    "TrainConfig",
    "RunSummary",
    "batch_plan",
    "load_yaml",
    "loss_sum",
    "resolve_config",
    "run_training",
    "train",
]

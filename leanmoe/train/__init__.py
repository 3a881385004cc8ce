"""Training: the trainer, its configuration, checkpoints, reports and the cost model."""

from leanmoe.train.config import TrainConfig
from leanmoe.train.cost import estimate_cost
from leanmoe.train.trainer import Trainer, TrainingError, TrainResult, train

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingError", "train", "estimate_cost"]

"""Training HDNNP ensembles: configuration, data and splits, loss, trainer, metrics."""

from qmlmm.data.training_set import SplitSettings, TrainingData, block_split, load_training_data
from qmlmm.training.config import TrainConfig, load_config
from qmlmm.training.parallel import TrainJob, train_jobs
from qmlmm.training.trainer import TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainJob",
    "TrainResult",
    "SplitSettings",
    "TrainingData",
    "block_split",
    "load_config",
    "load_training_data",
    "train",
    "train_jobs",
]

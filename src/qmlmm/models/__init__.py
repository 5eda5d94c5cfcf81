"""HDNNP models: atomic networks, ensembles, the self-describing model file, model engines."""

from qmlmm.models.ensemble import Ensemble, EnsemblePrediction
from qmlmm.models.hdnnp import HDNNP, ModelConfig, energy_and_forces
from qmlmm.models.model import ModelEngine, ModelMeta, Prediction, QMLMMModel

__all__ = [
    "HDNNP",
    "Ensemble",
    "EnsemblePrediction",
    "ModelConfig",
    "ModelEngine",
    "ModelMeta",
    "Prediction",
    "QMLMMModel",
    "energy_and_forces",
    "load_model",
]


def load_model(path: str, device: str = "cpu") -> QMLMMModel:
    """Load a model file (see :class:`QMLMMModel`)."""
    return QMLMMModel.load(path, device=device)

"""Fused (HFTA-style) PyTorch training for hyperparameter tuning.

``train`` runs one trial; ``train_group`` runs K trials that differ only in :data:`FUSIBLE`
hyperparameters as one stacked model, so each member gets the same result as training alone.
"""

from ._checkpoint import TrainedModel, load_model
from ._config import FUSIBLE, HYPERPARAMETERS, TrialConfig, lr_at
from ._data import Dataset, load_dataset
from ._gradcheck import gradcheck
from ._train import TrialResult, train, train_group

__all__ = [
    "FUSIBLE",
    "HYPERPARAMETERS",
    "Dataset",
    "TrainedModel",
    "TrialConfig",
    "TrialResult",
    "gradcheck",
    "load_dataset",
    "load_model",
    "lr_at",
    "train",
    "train_group",
]

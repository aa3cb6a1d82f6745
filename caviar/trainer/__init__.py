"""Fused (HFTA-style) PyTorch training for hyperparameter tuning.

``train`` runs one trial; ``train_group`` runs K trials that differ only in :data:`FUSIBLE`
hyperparameters as one stacked model, so each member gets the same result as training alone.

The contract with the tuning service (:mod:`caviar.trainer.spec`: hyperparameter names,
datasets, metrics) imports only the standard library; everything that needs torch is loaded on
first use, so the service can read the contract without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._pbt import PBT, Dimension, Exploit, Population
from .spec import DATASETS, FUSIBLE, HYPERPARAMETERS, METRICS, MODELS, TrialConfig, lr_at

if TYPE_CHECKING:
    from ._checkpoint import TrainedModel, load_model
    from ._data import Dataset, DatasetError, load_dataset
    from ._gradcheck import gradcheck
    from ._train import Interrupted, TrialResult, train, train_group
    from ._user_fused import FusedModels, MemberOptimizer, fused

# lazy: the torch-backed API, imported on first attribute access (keeps torch off the service's path)
_TORCH_API = {
    "TrainedModel": "._checkpoint",
    "load_model": "._checkpoint",
    "Dataset": "._data",
    "DatasetError": "._data",
    "load_dataset": "._data",
    "gradcheck": "._gradcheck",
    "Interrupted": "._train",
    "TrialResult": "._train",
    "train": "._train",
    "train_group": "._train",
    "FusedModels": "._user_fused",
    "MemberOptimizer": "._user_fused",
    "fused": "._user_fused",
}

__all__ = [
    "DATASETS",
    "FUSIBLE",
    "HYPERPARAMETERS",
    "METRICS",
    "MODELS",
    "PBT",
    "Dataset",
    "DatasetError",
    "Dimension",
    "Exploit",
    "FusedModels",
    "Interrupted",
    "MemberOptimizer",
    "Population",
    "TrainedModel",
    "TrialConfig",
    "TrialResult",
    "fused",
    "gradcheck",
    "load_dataset",
    "load_model",
    "lr_at",
    "train",
    "train_group",
]


def __getattr__(name: str) -> Any:
    module = _TORCH_API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""caviar: hyperparameter tuning service for PyTorch models.

``import caviar`` is light (httpx, no torch, no FastAPI) and is the public Python API::

    import caviar

    study = caviar.Client("http://127.0.0.1:8000").study("my-study")
    with study.ask() as trial:          # heartbeats in the background
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)   # sampled by the service
        for epoch in range(10):
            trial.report(score, epoch)  # Optuna's order: value, step
            if trial.should_prune():
                raise caviar.TrialPruned()  # or optuna.TrialPruned(): the trial ends PRUNED
        trial.tell(score)

    study.optimize(objective, n_trials=20)  # an unmodified Optuna objective

The service lives in :mod:`caviar.service` (with :mod:`caviar.storage`), the PyTorch trainer in
:mod:`caviar.trainer`, the worker processes in :mod:`caviar.worker`.
"""

from typing import TYPE_CHECKING, Any

from caviar._client import Client, Study, Trial, current_trial, report_group
from caviar._errors import CaviarApiError, LeaseLost, TrialPruned

if TYPE_CHECKING:
    from caviar._optuna_storage import BudgetExhausted, OptunaStorage, optuna_storage
    from caviar.trainer._user_fused import FusedModels, fused

__version__ = "0.1.0"

_LAZY = {"optuna_storage", "OptunaStorage", "BudgetExhausted"}
_LAZY_TORCH = {"FusedModels", "fused"}


def __getattr__(name: str) -> Any:
    """``caviar.optuna_storage`` and its types, imported on first use (they import optuna), and
    ``caviar.fused``/``caviar.FusedModels`` (they import torch)."""
    if name in _LAZY:
        from caviar import _optuna_storage  # lazy: optuna is heavy; `import caviar` stays light

        return getattr(_optuna_storage, name)
    if name in _LAZY_TORCH:
        from caviar.trainer import _user_fused  # lazy: torch is heavy; `import caviar` stays light

        return getattr(_user_fused, name)
    raise AttributeError(f"module 'caviar' has no attribute {name!r}")


__all__ = [
    "BudgetExhausted",
    "CaviarApiError",
    "Client",
    "FusedModels",
    "LeaseLost",
    "OptunaStorage",
    "Study",
    "Trial",
    "TrialPruned",
    "__version__",
    "current_trial",
    "fused",
    "optuna_storage",
    "report_group",
]

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

from caviar._client import Client, Study, Trial, current_trial
from caviar._errors import CaviarApiError, LeaseLost, TrialPruned

__version__ = "0.1.0"

__all__ = [
    "CaviarApiError",
    "Client",
    "LeaseLost",
    "Study",
    "Trial",
    "TrialPruned",
    "__version__",
    "current_trial",
]

"""caviar: hyperparameter tuning service for PyTorch models.

``import caviar`` is light (httpx, no torch, no FastAPI) and is the public Python API::

    import caviar

    study = caviar.Client("http://127.0.0.1:8000").study("my-study")
    with study.ask() as trial:          # heartbeats in the background
        for epoch in range(10):
            trial.report(epoch, score)  # raises caviar.TrialPruned when the pruner says so
        trial.tell(score)

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

"""The exceptions of caviar's Python API (client, worker, programs run by a worker)."""

from __future__ import annotations

from typing import Any


class CaviarApiError(Exception):
    """The service refused a request (or could not be reached).

    Attributes:
        status: the HTTP status (0 when the service could not be reached).
        code: the error code of the service's error envelope (``budget_exhausted``, ...).
        message: the service's human sentence.
        details: structured details (for validation errors: one entry per field).
        retry_after_s: how long the service asked to wait before trying again (its
            ``Retry-After``), when it said so.
    """

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after_s: float | None = None


class LeaseLost(CaviarApiError):
    """The trial's lease lapsed (or it was handed back): the service retries it elsewhere.

    Stop working on the trial; nothing it reports or tells counts any more.
    """


class TrialPruned(Exception):
    """Raise it when ``trial.should_prune()`` says so (``optuna.TrialPruned`` works the same).

    Wherever it escapes (a ``with study.ask() as trial:`` block, ``study.optimize``, a ``kind:
    python`` function, a ``kind: command`` program using the SDK) the trial ends PRUNED.
    """

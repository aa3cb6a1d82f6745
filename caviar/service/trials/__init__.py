"""The trial domain: lifecycle (ask, tell), reports, leases and reaping, reads, results (best, importances).

The REST API is the only caller from outside the service; the functions are re-exported here.
"""

from caviar.service.trials.leases import Caller, heartbeat, reap, release
from caviar.service.trials.lifecycle import ask, tell
from caviar.service.trials.reads import get_trial, list_trials, to_read
from caviar.service.trials.reports import Reported, ReportResult, report, report_many
from caviar.service.trials.results import best, importances

__all__ = [
    "Caller",
    "ReportResult",
    "Reported",
    "ask",
    "best",
    "get_trial",
    "heartbeat",
    "importances",
    "list_trials",
    "reap",
    "release",
    "report",
    "report_many",
    "tell",
    "to_read",
]

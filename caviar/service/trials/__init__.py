"""The trial domain: lifecycle (ask, report, tell), leases and reaping, reads, study results.

The REST API is the only caller from outside the service; the functions are re-exported here.
"""

from caviar.service.trials.leases import Caller, LeasePolicy, heartbeat, reap, release
from caviar.service.trials.lifecycle import ask, report, tell
from caviar.service.trials.reads import get_trial, list_trials, to_read
from caviar.service.trials.results import best, importances, narrow_space, refine

__all__ = [
    "Caller",
    "LeasePolicy",
    "ask",
    "best",
    "get_trial",
    "heartbeat",
    "importances",
    "list_trials",
    "narrow_space",
    "reap",
    "refine",
    "release",
    "report",
    "tell",
    "to_read",
]

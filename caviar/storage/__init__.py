"""caviar's storage: engines, caviar's own tables and migrations, and the Optuna storage factory."""

from caviar.storage._engine import (
    RenewalGate,
    display_url,
    is_sqlite,
    make_engine,
    make_sessionmaker,
    renewal_gate,
)
from caviar.storage._migrate import (
    DatabaseNotReady,
    check_ready,
    current_revision,
    head_revision,
    is_up_to_date,
    upgrade,
)
from caviar.storage._models import (
    ApiToken,
    Base,
    Schedule,
    ScheduleRun,
    StudyRecord,
    TrialLease,
    WorkerRecord,
    utcnow,
)
from caviar.storage._optuna import get_optuna_storage, reset_optuna_storages

__all__ = [
    "ApiToken",
    "Base",
    "DatabaseNotReady",
    "RenewalGate",
    "Schedule",
    "ScheduleRun",
    "StudyRecord",
    "TrialLease",
    "WorkerRecord",
    "check_ready",
    "current_revision",
    "display_url",
    "get_optuna_storage",
    "head_revision",
    "is_sqlite",
    "is_up_to_date",
    "make_engine",
    "make_sessionmaker",
    "renewal_gate",
    "reset_optuna_storages",
    "upgrade",
    "utcnow",
]

"""Fixtures of the store's contract suite: studies made through the store itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from caviar.service import store
from caviar.service.db import Database
from caviar.service.definition import check_params
from caviar.storage import StudyRecord
from tests.service.helpers import external_study

MakeStudy = Callable[..., StudyRecord]


@pytest.fixture
def make_study(db: Database) -> MakeStudy:
    """Create a study through the store: ``make_study(name, n_trials=..., **budget)``."""

    def make(name: str = "s", *, n_trials: int = 10, **budget: Any) -> StudyRecord:
        return store.create_study(
            db, store.parse_definition(external_study(name, n_trials=n_trials, **budget))
        )

    return make


def enqueue(db: Database, record: StudyRecord, lr: float = 0.01, *, value: float | None = None) -> int:
    """Add a waiting trial (or, with ``value``, a complete one) through the store; returns its id."""
    space = store.definition_of(record).search_space
    checked = check_params(space, {"lr": lr, "beta1": 0.9, "dropout": 0.1})
    values = [value] if value is not None else None
    return store.add_trial(db, record.optuna_study_id, space, checked, values=values)

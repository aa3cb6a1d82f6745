"""FastAPI dependencies (Annotated aliases used by every router)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.definition import NAME_PATTERN
from caviar.service.store import LeasePolicy
from caviar.service.types import INT32_MAX, MAX_OFFSET


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_lease_policy(request: Request) -> LeasePolicy:
    """The service's lease policy: built from its settings, the one place it is built."""
    return LeasePolicy.from_settings(get_settings_dep(request))


def may_act_on_any_trial(request: Request) -> bool:
    """Whether the caller may act on trials other workers asked for: write scope, or no auth."""
    scope = getattr(request.state, "token_scope", None)
    return scope is None or scope in ("write", "admin")


def may_see_env_values(request: Request) -> bool:
    """Whether the caller sees ``objective.env`` values (a read-scope caller sees only the names)."""
    return getattr(request.state, "token_scope", None) != "read"


DbDep = Annotated[Database, Depends(get_db)]
EnvValuesDep = Annotated[bool, Depends(may_see_env_values)]
AnyTrialDep = Annotated[bool, Depends(may_act_on_any_trial)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
LeasePolicyDep = Annotated[LeasePolicy, Depends(get_lease_policy)]

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128, description="The study's name.")]
TrialNumber = Annotated[int, Path(ge=0, le=INT32_MAX, description="The trial's number in its study.")]
ScheduleRef = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Id or name.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]

"""FastAPI dependencies (Annotated aliases used by every router)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from caviar.service.config import Settings
from caviar.service.db import Database


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]

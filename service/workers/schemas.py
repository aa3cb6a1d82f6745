"""Worker read schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class WorkerRead(BaseModel):
    id: str
    host: str
    pid: int
    device: str
    status: str
    live: bool
    current_trials: list[dict[str, Any]]
    started_at: datetime
    last_seen_at: datetime


class WorkerList(BaseModel):
    items: list[WorkerRead]
    total: int

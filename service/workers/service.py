"""Worker registration and listing (plain functions; the worker processes call them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from service.db import Database
from service.workers.schemas import WorkerList, WorkerRead
from storage import WorkerRecord, utcnow


def register_worker(db: Database, worker_id: str, *, host: str, pid: int, device: str) -> None:
    """Record (or re-record) a worker slot as started now."""
    now = utcnow()
    with db.session() as session, session.begin():
        record = session.get(WorkerRecord, worker_id)
        if record is None:
            record = WorkerRecord(id=worker_id, host=host, pid=pid, device=device)
            session.add(record)
        record.host, record.pid, record.device = host, pid, device
        record.status = "idle"
        record.current_trials = {"trials": []}
        record.started_at = now
        record.last_seen_at = now


def touch_worker(
    db: Database, worker_id: str, *, status: str, trials: Sequence[tuple[str, int]] = ()
) -> None:
    """Mark a worker alive now, with what it currently runs."""
    with db.session() as session, session.begin():
        record = session.get(WorkerRecord, worker_id)
        if record is None:
            return
        record.status = status
        record.current_trials = {"trials": [{"study": s, "number": n} for s, n in trials]}
        record.last_seen_at = utcnow()


def list_workers(db: Database, *, heartbeat_interval_s: float, include_stopped: bool = True) -> WorkerList:
    """Registered workers; ``live`` means seen within two heartbeat intervals."""
    cutoff = utcnow() - timedelta(seconds=2 * heartbeat_interval_s)
    with db.session() as session:
        records = list(session.scalars(select(WorkerRecord).order_by(WorkerRecord.started_at.desc())))
    items = []
    for record in records:
        live = record.status != "stopped" and record.last_seen_at >= cutoff
        if not include_stopped and not live:
            continue
        items.append(_read(record, live))
    return WorkerList(items=items, total=len(items))


def count_live_workers(db: Database, *, heartbeat_interval_s: float) -> int:
    return sum(1 for w in list_workers(db, heartbeat_interval_s=heartbeat_interval_s).items if w.live)


def _read(record: WorkerRecord, live: bool) -> WorkerRead:
    trials: list[dict[str, Any]] = list((record.current_trials or {}).get("trials", []))
    return WorkerRead(
        id=record.id,
        host=record.host,
        pid=record.pid,
        device=record.device,
        status=record.status if live or record.status == "stopped" else "lost",
        live=live,
        current_trials=trials,
        started_at=record.started_at,
        last_seen_at=record.last_seen_at,
    )

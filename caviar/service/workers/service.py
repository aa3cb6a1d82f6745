"""Workers: registration, one heartbeat renewing all of a worker's leases, the study queue.

Plain functions over a :class:`~caviar.service.db.Database`; workers reach them over REST.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, select, update

from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.service.store import (
    STOPPED_STATES,
    LeasePolicy,
    LeaseRow,
    definition_of,
    lease_rows,
    renewal,
    runnable_studies,
    trial_total,
)
from caviar.service.workers.schemas import (
    LostTrial,
    QueueItem,
    QueueList,
    TrialRef,
    WorkerList,
    WorkerRead,
)
from caviar.storage import WorkerRecord, utcnow


def register_worker(
    db: Database,
    worker_id: str,
    *,
    host: str,
    pid: int,
    device: str,
    live_taken: LeasePolicy | None = None,
) -> WorkerRead:
    """Record (or re-record) a worker slot as started now.

    Args:
        live_taken: when given (a ``worker``-scope caller), an id that is live under this policy
            (seen within one lease period, not stopped) is refused: another worker cannot take over
            a running worker's registration (a slot that starts again gets a new id: its pid).

    Raises:
        Conflict: ``worker_id_taken``.
    """
    now = utcnow()
    with db.session() as session, session.begin():
        record = session.get(WorkerRecord, worker_id)
        if (
            record is not None
            and live_taken is not None
            and record.status != "stopped"
            and record.last_seen_at >= now - timedelta(seconds=live_taken.lease_s)
        ):
            raise Conflict(
                f"worker {worker_id!r} is registered and live: pick another id",
                code="worker_id_taken",
            )
        if record is None:
            record = WorkerRecord(id=worker_id, host=host, pid=pid, device=device)
            session.add(record)
        record.host, record.pid, record.device = host, pid, device
        record.status = "idle"
        record.current_trials = {"trials": []}
        record.started_at = now
        record.last_seen_at = now
    return _read(record, live=True)


def beat(
    db: Database,
    worker_id: str,
    trials: Sequence[TrialRef],
    *,
    status: str = "busy",
    policy: LeasePolicy,
    proves: Callable[[TrialRef, LeaseRow], bool] | None = None,
) -> list[LostTrial]:
    """Renew the leases of ``trials`` (all of one worker's) in one statement; mark the worker seen.

    Runs on the lease path only (:attr:`~caviar.service.db.Database.lease_engine`, Core statements):
    one read of the leases, then one transaction with one UPDATE for all of them and one for the
    worker's row. No study lock, no Optuna storage, no ORM object: an import, a burst of asks or a
    slow sampler never makes it wait.

    Returns:
        The trials the worker must stop, with why: ``lease_lost`` (reaped or handed back: its
        retry runs elsewhere), ``trial_finished``, ``not_your_trial`` (another worker asked for
        it), ``trial_not_found`` (none of these leases is renewed), or ``study_stopped`` (its study
        is stopping: the lease is still renewed so the worker can prune the trial at its next
        report and tell it).

    Args:
        proves: when given (a ``worker``-scope caller), whether a reference proves its claim on
            a lease (the trial's credential); a trial it does not prove is ``not_your_trial`` and
            its lease is left alone. Without it the ``worker_id`` decides (write scope, no tokens).
    """

    def foreign(ref: TrialRef, lease: LeaseRow) -> bool:
        if proves is not None:
            return not proves(ref, lease)
        return lease.worker_id is not None and lease.worker_id != worker_id

    refs = {(ref.study, ref.number): ref for ref in trials}
    leases = lease_rows(db, list(refs))
    renewable = [
        lease.trial_id
        for key, lease in leases.items()
        if lease.error is None and not foreign(refs[key], lease)
    ]
    workers = cast(Table, WorkerRecord.__table__)
    with db.renewing() as connection:  # starts with its write: SQLite waits for the writer lock
        if renewable:
            connection.execute(renewal(connection.dialect.name, renewable, policy))
        connection.execute(
            update(workers)
            .where(workers.c.id == worker_id)
            .values(
                status=status,
                current_trials={"trials": [ref.model_dump(exclude={"credential"}) for ref in trials]},
                last_seen_at=utcnow(),
            )
        )
    lost = []
    for ref in trials:
        lease = leases.get((ref.study, ref.number))
        if lease is None:
            code = "trial_not_found"
        elif foreign(ref, lease):
            code = "not_your_trial"
        elif (ended := lease.error) is not None:
            code = ended
        elif lease.study_state in STOPPED_STATES:
            code = "study_stopped"
        else:
            continue
        lost.append(LostTrial(study=ref.study, number=ref.number, code=code))
    return lost


def queue(
    db: Database, *, kinds: Sequence[str] = (), names: Sequence[str] = (), limit: int = 100
) -> QueueList:
    """The studies that hand out trials, in the order workers take them."""
    records = runnable_studies(db, kinds=kinds, names=names)[:limit]
    return QueueList(
        items=[
            QueueItem(
                name=r.name,
                state=r.state,
                priority=r.priority,
                objective_kind=r.objective_kind,
                metrics=definition_of(r).metrics,
                trials_started=trial_total(db, r),
                warmup_trials=definition_of(r).warmup_trials(),
                definition=r.definition,
                created_at=r.created_at,
            )
            for r in records
        ]
    )


def list_workers(db: Database, *, policy: LeasePolicy, include_stopped: bool = True) -> WorkerList:
    """Registered workers; ``live`` means seen within one lease period (two heartbeat intervals)."""
    cutoff = utcnow() - timedelta(seconds=policy.lease_s)
    with db.session() as session:
        records = list(session.scalars(select(WorkerRecord).order_by(WorkerRecord.started_at.desc())))
    items = []
    for record in records:
        live = record.status != "stopped" and record.last_seen_at >= cutoff
        if not include_stopped and not live:
            continue
        items.append(_read(record, live))
    return WorkerList(items=items, total=len(items))


def count_live_workers(db: Database, *, policy: LeasePolicy) -> int:
    """How many workers are live (see :func:`list_workers`)."""
    return sum(1 for w in list_workers(db, policy=policy).items if w.live)


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

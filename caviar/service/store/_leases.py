"""Leases: THE lease policy (built from Settings), renewal, and what a lease's status means.

An ask starts a lease (:meth:`LeasePolicy.expiry`); a trial's heartbeat, a report and a worker's
one heartbeat for all its trials renew it (:func:`renew`, :func:`renew_many`, :func:`lease_rows`);
a lease that ended answers with the error :func:`lease_error` names. Reaping and handing back live
with the trial domain (:mod:`caviar.service.trials.leases`).

Renewals run on their own path: the database's :attr:`~caviar.service.db.Database.lease_engine`
(a small pool no ask, import or sampler takes), plain Core statements (no ORM objects), one UPDATE
for all of a worker's leases, and expiry times from the DATABASE's clock (:func:`db_now`), which
the reaper judges them by too, so clocks of API hosts never matter. A trial being sampled is held
by :class:`SamplingHolds` (renewed while its sampler runs; its lease proper starts once its
parameters are stored).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import ColumnElement, String, Table, Update, func, literal, select, tuple_, update
from sqlalchemy.orm import Session

from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.storage import StudyRecord, TrialLease, utcnow

if TYPE_CHECKING:
    from caviar.service.config import Settings


@dataclass(frozen=True)
class LeasePolicy:
    """Lease timing: a lease lasts two heartbeat intervals.

    Build it with :meth:`from_settings` (``CAVIAR_HEARTBEAT_INTERVAL_S``); there is no default.

    Attributes:
        heartbeat_interval_s: how often holders of a lease are asked to renew it.
        margin_s: how long past its expiry (by the database's clock) the reaper still spares a
            lease (``Settings.reap_margin_s``; None: none).
    """

    heartbeat_interval_s: float
    margin_s: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        """The service's lease policy, from its settings."""
        return cls(heartbeat_interval_s=settings.heartbeat_interval_s, margin_s=settings.reap_margin_s)

    @property
    def lease_s(self) -> float:
        """How long a lease lasts without a heartbeat (also: how long a worker counts as live)."""
        return 2 * self.heartbeat_interval_s

    def expiry(self, now: datetime) -> datetime:
        """When a lease started or renewed at ``now`` lapses."""
        return now + timedelta(seconds=self.lease_s)


# ---- what a lease's status means ----------------------------------------------------------------

LEASE_ERRORS = {"reaped": "lease_lost", "released": "lease_lost", "finished": "trial_finished"}
"""THE lease-status-to-error map: a reaped or handed-back trial lost its lease (its retry runs
instead); a finished one was told. An ``active`` lease is no error."""


def lease_error(lease: TrialLease) -> str | None:
    """The error code a lease in this status answers with (None while it is active)."""
    return LEASE_ERRORS.get(lease.status)


def held_by_other(lease: TrialLease | None, worker_id: str | None) -> bool:
    """Whether a worker other than ``worker_id`` asked for the trial (a trial belongs to its asker)."""
    return lease is not None and lease.worker_id is not None and lease.worker_id != worker_id


def lease_lost(record: StudyRecord, number: int, lease: TrialLease) -> Conflict:
    """The refusal for an action on a trial whose lease ended."""
    return Conflict(
        f"trial {number} of {record.name!r} lost its lease ({lease.reason or lease.status}); "
        "its retry runs instead",
        code="lease_lost",
    )


def check_running(db: Database, record: StudyRecord, trial: FrozenTrial) -> TrialLease | None:
    """The trial's lease (None for a trial created outside caviar); raise if it cannot run on.

    Raises:
        Conflict: ``lease_lost`` (reaped or handed back: its retry runs instead),
            ``trial_finished`` or ``trial_not_running``.
    """
    lease = lease_of(db, trial._trial_id)
    if lease is not None and lease_error(lease) == "lease_lost":
        raise lease_lost(record, trial.number, lease)
    if trial.state.is_finished():
        raise Conflict(f"trial {trial.number} of {record.name!r} is already finished", code="trial_finished")
    if trial.state != TrialState.RUNNING:
        raise Conflict(f"trial {trial.number} of {record.name!r} is not running", code="trial_not_running")
    return lease


# ---- lease rows -------------------------------------------------------------------------------


def lease_of(db: Database, trial_id: int) -> TrialLease | None:
    """caviar's lease row of a trial (None for a trial created outside caviar)."""
    with db.session() as session:
        return session.get(TrialLease, trial_id)


def leases_for(db: Database, trial_ids: Sequence[int]) -> dict[int, TrialLease]:
    """The lease rows of many trials at once, by trial id."""
    if not trial_ids:
        return {}
    with db.session() as session:
        rows = session.scalars(select(TrialLease).where(TrialLease.trial_id.in_(list(trial_ids))))
        return {lease.trial_id: lease for lease in rows}


def renew_leases(session: Session, trial_ids: Sequence[int], policy: LeasePolicy) -> int:
    """Extend the active leases of ``trial_ids`` by one lease period, in the caller's transaction.

    Returns:
        How many were renewed (a lease that is no longer active is not).
    """
    if not trial_ids:
        return 0
    result = session.execute(
        update(TrialLease)
        .where(TrialLease.trial_id.in_(list(trial_ids)), TrialLease.status == "active")
        .values(expires_at=policy.expiry(utcnow()))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def renew(db: Database, trial_id: int, policy: LeasePolicy) -> bool:
    """Extend an active lease by one lease period (on the lease path: :func:`renew_many`); False
    when the trial has no active lease."""
    return bool(renew_many(db, [trial_id], policy))


def close_lease(db: Database, trial_id: int, reason: str | None) -> None:
    """Mark an active lease finished (its trial was told)."""
    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease)
            .where(TrialLease.trial_id == trial_id, TrialLease.status == "active")
            .values(status="finished", reason=reason[:2000] if reason else None)
        )


TELL_GRACE_S = 60.0
"""How long a trial may stay running after a tell closed its lease: past this, the tell died
between closing the lease and writing the trial's end, and the reaper recovers the trial."""


def claim_end(db: Database, trial_id: int, status: str, reason: str | None, *, due: Any = None) -> bool:
    """End a trial's ACTIVE lease with ``status`` before the trial's end is written to Optuna.

    THE arbiter of a race between a tell and the reaper (or a hand-back): each ends the lease with
    one conditional UPDATE, and only the one whose UPDATE matched the active row writes the trial's
    state. Optuna's own read-check-write of a trial's state is not atomic on SQLite, where both
    would succeed and a trial told ``pruned`` could end ``fail``. The lease's ``expires_at`` is
    stamped with the database's now: when it ended (see :data:`TELL_GRACE_S`).

    Args:
        due: an extra SQL condition the lease must meet (the reaper's: lapsed or past its deadline).

    Returns:
        Whether this call ended the lease.
    """
    condition = (TrialLease.trial_id == trial_id) & (TrialLease.status == "active")
    if due is not None:
        condition = condition & due
    with db.session() as session, session.begin():
        result = session.execute(
            update(TrialLease)
            .where(condition)
            .values(
                status=status,
                reason=reason[:2000] if reason else None,
                expires_at=db_now(db.engine.dialect.name),
            )
        )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def end_told(db: Database, trial_id: int) -> TrialLease | None:
    """End a trial's active lease for a complete/pruned tell (:func:`claim_end`), before Optuna's write.

    Returns:
        The lease when the reaper or a hand-back ended it first (the tell lost: ``lease_lost``),
        else None (this call ended it, the trial has no lease, or a tell ended it before).
    """
    if claim_end(db, trial_id, "finished", None):
        return None
    lease = lease_of(db, trial_id)
    return lease if lease is not None and lease_error(lease) == "lease_lost" else None


def died_while_told(db: Database, trial_ids: Sequence[int]) -> set[int]:
    """Of these running trials, those whose lease a tell ended over :data:`TELL_GRACE_S` ago."""
    if not trial_ids:
        return set()
    with db.session() as session:
        return set(
            session.scalars(
                select(TrialLease.trial_id).where(
                    TrialLease.trial_id.in_(list(trial_ids)),
                    TrialLease.status == "finished",
                    TrialLease.expires_at < db_now(db.engine.dialect.name, -TELL_GRACE_S),
                )
            )
        )


def end_lease(db: Database, trial_id: int, status: str, reason: str) -> None:
    """Record how a lease ended (``reaped``, ``released`` or ``finished``) and why."""
    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease).where(TrialLease.trial_id == trial_id).values(status=status, reason=reason)
        )


# ---- the lease path: the database's clock, its own pool, Core statements ----------------------

_LEASES = cast(Table, TrialLease.__table__)
_STUDIES = cast(Table, StudyRecord.__table__)


def db_now(dialect: str, offset_s: float = 0.0) -> ColumnElement[Any]:
    """The database's clock plus ``offset_s`` seconds, as SQL comparable with a stored UTC time.

    PostgreSQL: ``now() + interval``. SQLite: ``strftime('%Y-%m-%d %H:%M:%f', 'now', '+N seconds')``
    padded to the microseconds SQLAlchemy stores, so stored times compare as text in time order.
    """
    if dialect == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{offset_s:+.3f} seconds", type_=String).concat(
            literal("000")
        )
    return func.now() + timedelta(seconds=offset_s)


def new_expiry(dialect: str, policy: LeasePolicy) -> ColumnElement[Any] | datetime:
    """The expiry a renewal stamps: one lease period past the database's now (tests may replace it
    with a clock of their own)."""
    return db_now(dialect, policy.lease_s)


def fresh_until(dialect: str, seconds: float) -> ColumnElement[Any] | datetime:
    """The time a lease that needs no renewal yet outlasts: ``seconds`` past the database's now
    (tests may replace it with a clock of their own, as :func:`new_expiry`)."""
    return db_now(dialect, seconds)


def renewal(dialect: str, trial_ids: Sequence[int], policy: LeasePolicy) -> Update:
    """THE renewal: one UPDATE extending the active leases of ``trial_ids`` (see :func:`new_expiry`)."""
    return (
        update(_LEASES)
        .where(_LEASES.c.trial_id.in_(sorted(set(trial_ids))), _LEASES.c.status == "active")
        .values(expires_at=new_expiry(dialect, policy))
    )


def renew_many(db: Database, trial_ids: Sequence[int], policy: LeasePolicy) -> int:
    """Extend the active leases of ``trial_ids`` to one lease period from the database's now.

    One UPDATE on the lease pool, in its own short transaction (never inside another one).

    Returns:
        How many were renewed (a lease that is no longer active is not).
    """
    if not trial_ids:
        return 0
    with db.renewing() as connection:
        result = connection.execute(renewal(connection.dialect.name, trial_ids, policy))
    return int(result.rowcount)


def renew_one(db: Database, trial_id: int, policy: LeasePolicy) -> datetime | None:
    """:func:`renew_many` for one trial, answering its new expiry (None: no active lease)."""
    with db.renewing() as connection:
        statement = renewal(connection.dialect.name, [trial_id], policy)
        expires_at: datetime | None = connection.execute(statement.returning(_LEASES.c.expires_at)).scalar()
    return expires_at


@dataclass(frozen=True)
class LeaseRow:
    """What the lease path reads of one lease (no ORM object): its keys, holder and status.

    Attributes:
        trial_id: Optuna's trial id.
        study_id: caviar's study id.
        number: the trial's number in its study.
        worker_id: the worker that asked for it.
        status: ``active``, ``finished``, ``reaped`` or ``released``.
        study: the study's name.
        study_state: the study's state.
    """

    trial_id: int
    study_id: int
    number: int
    worker_id: str | None
    status: str
    study: str
    study_state: str

    @property
    def error(self) -> str | None:
        """The error code this lease answers with (None while it is active)."""
        return LEASE_ERRORS.get(self.status)


def lease_rows(db: Database, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], LeaseRow]:
    """The leases of ``(study name, trial number)`` pairs, read in one statement on the lease pool."""
    if not keys:
        return {}
    wanted = sorted(set(keys))
    query = (
        select(
            _LEASES.c.trial_id,
            _LEASES.c.study_id,
            _LEASES.c.number,
            _LEASES.c.worker_id,
            _LEASES.c.status,
            _STUDIES.c.name,
            _STUDIES.c.state,
        )
        .select_from(_LEASES.join(_STUDIES, _STUDIES.c.id == _LEASES.c.study_id))
        .where(tuple_(_STUDIES.c.name, _LEASES.c.number).in_(wanted))
    )
    with db.lease_engine.connect() as connection:
        rows = connection.execute(query).all()
    return {
        (row.name, row.number): LeaseRow(
            row.trial_id, row.study_id, row.number, row.worker_id, row.status, row.name, row.state
        )
        for row in rows
    }


class SamplingHolds:
    """The trials this process is sampling, whose leases it renews until their parameters are stored.

    A sampler may outlast a lease (a GP over a long history); the reaper must never fail a trial
    that is still being sampled. While held, one background thread renews every held lease every
    half heartbeat interval (one UPDATE on the lease pool), and this process's reaper skips them
    outright (:meth:`held`); the thread ends after an interval with nothing held (it would otherwise
    keep its disposed Database alive). Should the process die, the renewals stop and the lease
    lapses as any other does.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ids: Counter[int] = Counter()
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._interval_s = 60.0
        self._policy: LeasePolicy | None = None
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, trial_id: int, policy: LeasePolicy) -> Iterator[None]:
        """Keep ``trial_id``'s lease while the block runs (its sampling)."""
        with self._guard:
            self._ids[trial_id] += 1
            self._policy = policy
            if policy.heartbeat_interval_s / 2 < self._interval_s:
                self._interval_s = policy.heartbeat_interval_s / 2
                self._wake.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="caviar-sampling-holds", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._guard:
                self._ids[trial_id] -= 1
                if self._ids[trial_id] <= 0:
                    del self._ids[trial_id]

    def held(self) -> set[int]:
        """The trial ids being sampled in this process now."""
        with self._guard:
            return set(self._ids)

    def _loop(self) -> None:
        while True:
            if self._wake.wait(self._interval_s):  # the interval changed: wait that long first
                self._wake.clear()
                continue
            with self._guard:
                if not self._ids:  # nothing held for a whole interval: the next hold starts a thread
                    self._thread = None
                    return
                ids, policy = sorted(self._ids), self._policy
            if policy is not None:
                with contextlib.suppress(Exception):  # a database blip: the next round renews
                    renew_many(self._db, ids, policy)


_holds_guard = threading.Lock()


@contextlib.contextmanager
def sampling(db: Database, lease: TrialLease, policy: LeasePolicy) -> Iterator[None]:
    """Hold ``lease`` while its trial is sampled; then start it afresh (``lease.expires_at`` too).

    The lease proper starts once the trial's parameters are stored: a sampler slower than a lease
    never costs the trial (see :class:`SamplingHolds`).
    """
    with sampling_holds(db).hold(lease.trial_id, policy):
        yield
        renewed = renew_one(db, lease.trial_id, policy)
        lease.expires_at = renewed or lease.expires_at


def sampling_holds(db: Database) -> SamplingHolds:
    """The :class:`SamplingHolds` of ``db`` (one per Database object)."""
    holds: SamplingHolds | None = getattr(db, "_sampling_holds", None)
    if holds is None:
        with _holds_guard:
            holds = getattr(db, "_sampling_holds", None)
            if holds is None:
                holds = SamplingHolds(db)
                db._sampling_holds = holds  # type: ignore[attr-defined]
    return holds

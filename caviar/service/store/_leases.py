"""Leases: THE lease policy (built from Settings), renewal, and what a lease's status means.

An ask starts a lease (:meth:`LeasePolicy.expiry`); a trial's heartbeat, a report and a worker's
one heartbeat for all its trials renew it (:func:`renew`, :func:`renew_leases`); a lease that
ended answers with the error :func:`lease_error` names. Reaping and handing back live with the
trial domain (:mod:`caviar.service.trials.leases`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select, update
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
    """

    heartbeat_interval_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        """The service's lease policy, from its settings."""
        return cls(heartbeat_interval_s=settings.heartbeat_interval_s)

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
    """Extend an active lease by one lease period; False when the trial has no active lease."""
    with db.session() as session, session.begin():
        return bool(renew_leases(session, [trial_id], policy))


def close_lease(db: Database, trial_id: int, reason: str | None) -> None:
    """Mark an active lease finished (its trial was told)."""
    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease)
            .where(TrialLease.trial_id == trial_id, TrialLease.status == "active")
            .values(status="finished", reason=reason[:2000] if reason else None)
        )


def end_lease(db: Database, trial_id: int, status: str, reason: str) -> None:
    """Record how a lease ended (``reaped``, ``released`` or ``finished``) and why."""
    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease).where(TrialLease.trial_id == trial_id).values(status=status, reason=reason)
        )

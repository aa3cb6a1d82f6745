"""Trial credentials: a token that can only report, heartbeat, upload and tell ONE running trial.

An ask answers with one (``credential``) when the service has tokens. A worker gives it to the
program it runs as ``CAVIAR_API_TOKEN`` instead of its own token, so user code can act on its own
trial and nothing else: not another trial, not another study, no create, no read of definitions.

A credential is ``cvt_<trial id>.<study id>.<number>.<lease start>.<mac>``: an HMAC-SHA256 (keyed
by a key derived from the admin token, so every replica agrees and nothing is stored) over the
trial's Optuna id, its study's row id, its number and when its lease started (in microseconds: ids
are used again on SQLite after a delete, a lease start is not). Only the ask that claimed the trial
answers it, so it is also how a ``worker`` token proves it holds the trial (``X-Caviar-Lease``).
It is accepted only while that trial's lease is
``active``: it expires when the trial is told, handed back or reaped, and a study deleted and
created again under the same name (new ids) does not accept it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import select

from caviar.service.db import Database
from caviar.storage import StudyRecord, TrialLease

PREFIX: Final = "cvt_"
_FORM: Final = re.compile(r"^cvt_(\d{1,19})\.(\d{1,19})\.(\d{1,10})\.(\d{1,20})\.([0-9a-f]{64})$")
TRIAL_ROUTE: Final = re.compile(
    r"^/api/v1/studies/(?P<study>[^/]+)/trials/(?P<number>\d{1,10})"
    r"(?:/(?P<action>report|heartbeat|tell|artifacts|suggest))?/?$"
)
"""What a trial credential may request: POST report/heartbeat/tell/artifacts (and the define-by-run
``suggest``) of its own trial, and GET of its own trial."""

BATCH_ROUTE: Final = re.compile(r"^/api/v1/studies/(?P<study>[^/]+)/trials/reports/?$")
"""And a batch of reports in its own trial's study (a fused group's epoch): each report in it must
carry its own trial's credential (the route checks each, as for a worker token)."""


@dataclass(frozen=True)
class TrialGrant:
    """What a verified trial credential names: a trial, and the lease an ask started on it."""

    trial_id: int
    study_id: int
    number: int
    stamp: int = 0
    """When the lease started, in microseconds since the epoch: ids can be used again (a study
    deleted and created again on SQLite), a lease's start cannot."""

    def names(self, lease: TrialLease) -> bool:
        """Whether this grant is for ``lease`` (the same trial, study, number and lease start)."""
        return (self.trial_id, self.study_id, self.number, self.stamp) == (
            lease.trial_id,
            lease.study_id,
            lease.number,
            stamp_of(lease.started_at),
        )


def stamp_of(started_at: datetime) -> int:
    """A lease's start as whole microseconds since the epoch (UTC; naive values are UTC)."""
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=UTC)
    delta = started_at - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def derive_key(admin_token: str) -> bytes:
    """The HMAC key of trial credentials (derived from the admin token: rotating it revokes them)."""
    return hashlib.sha256(
        b"caviar trial credential\x00" + admin_token.encode("utf-8", "surrogatepass")
    ).digest()


def _mac(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def mint(key: bytes, trial_id: int, study_id: int, number: int, stamp: int = 0) -> str:
    """The credential of one trial's lease (``stamp``: see :attr:`TrialGrant.stamp`)."""
    payload = f"{trial_id}.{study_id}.{number}.{stamp}"
    return f"{PREFIX}{payload}.{_mac(key, payload)}"


def verify(key: bytes, token: str) -> TrialGrant | None:
    """The trial a credential names, or None when it is malformed or forged."""
    match = _FORM.match(token)
    if match is None:
        return None
    trial_id, study_id, number, stamp, mac = match.groups()
    if not hmac.compare_digest(_mac(key, f"{trial_id}.{study_id}.{number}.{stamp}"), mac):
        return None
    return TrialGrant(int(trial_id), int(study_id), int(number), int(stamp))


def mint_for(db: Database, key: bytes, study: str, number: int) -> str | None:
    """The credential of trial ``number`` of ``study`` (None when it has no lease)."""
    with db.session() as session:
        row = session.execute(
            select(TrialLease.trial_id, TrialLease.study_id, TrialLease.started_at)
            .join(StudyRecord, StudyRecord.id == TrialLease.study_id)
            .where(StudyRecord.name == study, TrialLease.number == number)
        ).first()
    if row is None:
        return None
    return mint(key, row.trial_id, row.study_id, number, stamp_of(row.started_at))


def _lease(db: Database, grant: TrialGrant, study: str) -> TrialLease | None:
    """The lease ``grant`` names, if it is trial ``grant.number`` of ``study``."""
    with db.session() as session:
        lease = session.scalars(
            select(TrialLease)
            .join(StudyRecord, StudyRecord.id == TrialLease.study_id)
            .where(
                TrialLease.trial_id == grant.trial_id,
                TrialLease.study_id == grant.study_id,
                TrialLease.number == grant.number,
                StudyRecord.name == study,
            )
        ).first()
    return lease if lease is not None and grant.names(lease) else None


def is_running(db: Database, grant: TrialGrant, study: str) -> bool:
    """Whether the granted trial is trial ``grant.number`` of ``study`` and its lease is active."""
    lease = _lease(db, grant, study)
    return lease is not None and lease.status == "active"


def names_trial(db: Database, key: bytes, token: str, study: str, number: int) -> bool:
    """Whether ``token`` is the credential of trial ``number`` of ``study`` (whatever its lease's state).

    The proof a ``worker``-scope caller gives that it claimed the trial (only the ask that claimed
    it answered this credential); whether the trial still runs is the lifecycle's to say.
    """
    grant = verify(key, token) if len(token) <= 512 else None
    return grant is not None and grant.number == number and _lease(db, grant, study) is not None

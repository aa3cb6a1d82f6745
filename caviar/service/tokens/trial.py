"""Trial credentials: a token that can only report, heartbeat, upload and tell ONE running trial.

An ask answers with one (``credential``) when the service has tokens. A worker gives it to the
program it runs as ``CAVIAR_API_TOKEN`` instead of its own token, so user code can act on its own
trial and nothing else: not another trial, not another study, no create, no read of definitions.

A credential is ``cvt_<trial id>.<study id>.<number>.<mac>``: an HMAC-SHA256 (keyed by a key
derived from the admin token, so every replica agrees and nothing is stored) over the trial's
Optuna id, its study's row id and its number. It is accepted only while that trial's lease is
``active``: it expires when the trial is told, handed back or reaped, and a study deleted and
created again under the same name (new ids) does not accept it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select

from caviar.service.db import Database
from caviar.storage import StudyRecord, TrialLease

PREFIX: Final = "cvt_"
_FORM: Final = re.compile(r"^cvt_(\d{1,19})\.(\d{1,19})\.(\d{1,10})\.([0-9a-f]{64})$")
TRIAL_ROUTE: Final = re.compile(
    r"^/api/v1/studies/(?P<study>[^/]+)/trials/(?P<number>\d{1,10})"
    r"(?:/(?P<action>report|heartbeat|tell|artifacts|suggest))?/?$"
)
"""What a trial credential may request: POST report/heartbeat/tell/artifacts (and the define-by-run
``suggest``) of its own trial, and GET of its own trial."""


@dataclass(frozen=True)
class TrialGrant:
    """What a verified trial credential names."""

    trial_id: int
    study_id: int
    number: int


def derive_key(admin_token: str) -> bytes:
    """The HMAC key of trial credentials (derived from the admin token: rotating it revokes them)."""
    return hashlib.sha256(
        b"caviar trial credential\x00" + admin_token.encode("utf-8", "surrogatepass")
    ).digest()


def _mac(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def mint(key: bytes, trial_id: int, study_id: int, number: int) -> str:
    """The credential of one trial."""
    payload = f"{trial_id}.{study_id}.{number}"
    return f"{PREFIX}{payload}.{_mac(key, payload)}"


def verify(key: bytes, token: str) -> TrialGrant | None:
    """The trial a credential names, or None when it is malformed or forged."""
    match = _FORM.match(token)
    if match is None:
        return None
    trial_id, study_id, number, mac = match.groups()
    if not hmac.compare_digest(_mac(key, f"{trial_id}.{study_id}.{number}"), mac):
        return None
    return TrialGrant(int(trial_id), int(study_id), int(number))


def mint_for(db: Database, key: bytes, study: str, number: int) -> str | None:
    """The credential of trial ``number`` of ``study`` (None when it has no lease)."""
    with db.session() as session:
        row = session.execute(
            select(TrialLease.trial_id, TrialLease.study_id)
            .join(StudyRecord, StudyRecord.id == TrialLease.study_id)
            .where(StudyRecord.name == study, TrialLease.number == number)
        ).first()
    return None if row is None else mint(key, row.trial_id, row.study_id, number)


def is_running(db: Database, grant: TrialGrant, study: str) -> bool:
    """Whether the granted trial is trial ``grant.number`` of ``study`` and its lease is active."""
    with db.session() as session:
        found = session.execute(
            select(TrialLease.trial_id)
            .join(StudyRecord, StudyRecord.id == TrialLease.study_id)
            .where(
                TrialLease.trial_id == grant.trial_id,
                TrialLease.study_id == grant.study_id,
                TrialLease.number == grant.number,
                TrialLease.status == "active",
                StudyRecord.name == study,
            )
        ).first()
    return found is not None

"""Files stored with trials (checkpoints, logs) as Optuna artifacts: the dashboard lists them too."""

from __future__ import annotations

import json
import mimetypes
import os
import time
import uuid
from dataclasses import asdict
from typing import BinaryIO, Final

from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts._upload import ArtifactMeta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.errors import Conflict, NotFound
from caviar.service.store import (
    ARTIFACTS_ATTR_PREFIX,
    all_trials,
    artifact_metas,
    check_running,
    definition_of,
    frozen,
    load_record,
    ranked,
)
from caviar.service.trials.leases import ANYONE, Caller, check_owner
from caviar.service.trials.schemas import ArtifactRead

CHECKPOINT_FILENAME = "checkpoint.pt"
FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Names of files stored with trials: no directories, no hidden files."""
UPLOADED_ATTR: Final = "caviar:uploaded:"
"""Trial system attribute (+ artifact id): when the file was stored, in ns since the epoch."""


def check_upload(db: Database, name: str, number: int, caller: Caller = ANYONE) -> None:
    """Refuse an upload before its body is read: the trial must run and be the caller's.

    Raises:
        Conflict: ``trial_finished``, ``lease_lost``, ``trial_not_running``, ``not_your_trial``.
    """
    record = load_record(db, name)
    trial = frozen(db, record, number)
    lease = check_running(db, record, trial)
    check_owner(record, number, lease, caller)


def save_artifact(
    db: Database,
    store: FileSystemArtifactStore,
    name: str,
    number: int,
    path: str,
    caller: Caller = ANYONE,
) -> str:
    """Attach the file at ``path`` to running trial ``number`` of study ``name``; returns its id.

    The artifact keeps the file's base name (``checkpoint.pt``, ``trial.log``, ...) and the time
    it was stored (:data:`UPLOADED_ATTR`), which orders files of the same name. A trial that ended
    meanwhile keeps nothing: the stored file is removed again.

    Raises:
        Conflict: as :func:`check_upload`.
    """
    check_upload(db, name, number, caller)
    record = load_record(db, name)
    trial = frozen(db, record, number)
    filename = os.path.basename(path)
    mimetype, encoding = mimetypes.guess_type(filename)
    meta = ArtifactMeta(
        artifact_id=str(uuid.uuid4()),
        filename=filename,
        mimetype=mimetype or "application/octet-stream",
        encoding=encoding,
    )
    with open(path, "rb") as handle:
        store.write(meta.artifact_id, handle)
    try:
        # Optuna refuses either write once the trial is finished: a tell or the reaper won
        db.optuna.set_trial_system_attr(trial._trial_id, UPLOADED_ATTR + meta.artifact_id, time.time_ns())
        db.optuna.set_trial_system_attr(
            trial._trial_id, ARTIFACTS_ATTR_PREFIX + meta.artifact_id, json.dumps(asdict(meta))
        )
    except UpdateFinishedTrialError:
        store.remove(meta.artifact_id)
        raise Conflict(
            f"trial {number} of {name!r} finished while its file was uploaded", code="trial_finished"
        ) from None
    return meta.artifact_id


def list_artifacts(db: Database, name: str, number: int) -> list[ArtifactRead]:
    """The files stored with a trial, oldest first."""
    trial = frozen(db, load_record(db, name), number)
    return [
        ArtifactRead(artifact_id=m.artifact_id, filename=m.filename)
        for m in artifact_metas(trial.system_attrs)
    ]


def open_artifact(
    db: Database, store: FileSystemArtifactStore, name: str, number: int, filename: str
) -> BinaryIO:
    """The newest file named ``filename`` stored with trial ``number`` (a binary reader).

    Raises:
        NotFound: ``artifact_not_found``.
    """
    trial = frozen(db, load_record(db, name), number)
    reader = _newest(db, store, trial, filename)
    if reader is None:
        raise NotFound(f"trial {number} of {name!r} has no file {filename!r}", code="artifact_not_found")
    return reader


def _newest(
    db: Database, store: FileSystemArtifactStore, trial: FrozenTrial, filename: str
) -> BinaryIO | None:
    metas = [m for m in artifact_metas(trial.system_attrs) if m.filename == filename]
    if not metas:
        return None
    # newest by the time it was stored (Optuna keeps them by random id); files stored before
    # caviar recorded times come first, in Optuna's order
    stored = trial.system_attrs
    metas.sort(key=lambda m: int(stored.get(UPLOADED_ATTR + m.artifact_id, -1)))
    try:
        return store.open_reader(metas[-1].artifact_id)
    except ArtifactNotFound:
        raise NotFound(
            f"the file {filename!r} of trial {trial.number} is missing from the artifact store "
            "(is CAVIAR_ARTIFACT_DIR the one the service used when it was stored?)",
            code="artifact_not_found",
        ) from None


def open_checkpoint(
    db: Database, store: FileSystemArtifactStore, name: str, number: int | None = None
) -> tuple[int, str, BinaryIO]:
    """The checkpoint of trial ``number`` (default: the best complete trial that has one).

    Returns:
        The trial number, the artifact's file name and an open binary reader.
    """
    record = load_record(db, name)
    if number is None:
        complete = [t for t in all_trials(db, record, [TrialState.COMPLETE]) if t.values]
        candidates = ranked(definition_of(record), complete)
    else:
        candidates = [frozen(db, record, number)]
    for trial in candidates:
        reader = _newest(db, store, trial, CHECKPOINT_FILENAME)
        if reader is not None:
            return trial.number, CHECKPOINT_FILENAME, reader
    which = f"trial {number}" if number is not None else "any completed trial"
    raise NotFound(f"no checkpoint stored for {which} of {name!r}", code="checkpoint_not_found")

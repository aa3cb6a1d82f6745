"""Files stored with trials (checkpoints, logs) as Optuna artifacts: the dashboard lists them too."""

from __future__ import annotations

from typing import BinaryIO

from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.errors import NotFound
from caviar.service.store import all_trials, definition_of, frozen, load_record, ranked
from caviar.service.trials.schemas import ArtifactRead

CHECKPOINT_FILENAME = "checkpoint.pt"
FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Names of files stored with trials: no directories, no hidden files."""


def save_artifact(db: Database, store: FileSystemArtifactStore, name: str, number: int, path: str) -> str:
    """Attach the file at ``path`` to trial ``number`` of study ``name``; returns the artifact id.

    The artifact keeps the file's base name (``checkpoint.pt``, ``trial.log``, ...).
    """
    record = load_record(db, name)
    trial = frozen(db, record, number)
    return upload_artifact(artifact_store=store, file_path=path, study_or_trial=trial, storage=db.optuna)


def list_artifacts(db: Database, name: str, number: int) -> list[ArtifactRead]:
    """The files stored with a trial, oldest first."""
    trial = frozen(db, load_record(db, name), number)
    return [
        ArtifactRead(artifact_id=m.artifact_id, filename=m.filename)
        for m in get_all_artifact_meta(trial, storage=db.optuna)
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
    metas = [m for m in get_all_artifact_meta(trial, storage=db.optuna) if m.filename == filename]
    if not metas:
        return None
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

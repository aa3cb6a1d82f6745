"""Trial checkpoints stored as Optuna artifacts (file system store, listed by the dashboard)."""

from __future__ import annotations

import os
from typing import BinaryIO

from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from caviar.service.db import Database
from caviar.service.errors import NotFound
from caviar.service.studies.service import all_trials, definition_of, load_record, ranked

CHECKPOINT_FILENAME = "checkpoint.pt"
FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Names of files stored with trials: no directories, no hidden files."""


def artifact_store(artifact_dir: str) -> FileSystemArtifactStore:
    """The file-system artifact store under ``CAVIAR_ARTIFACT_DIR``."""
    os.makedirs(artifact_dir, exist_ok=True)
    return FileSystemArtifactStore(artifact_dir)


def save_artifact(db: Database, store: FileSystemArtifactStore, name: str, number: int, path: str) -> str:
    """Attach the file at ``path`` to trial ``number`` of study ``name``; returns the artifact id.

    The artifact keeps the file's base name (``checkpoint.pt``, ``trial.log``, ...).
    """
    record = load_record(db, name)
    trial_id = db.optuna.get_trial_id_from_study_id_trial_number(record.optuna_study_id, number)
    return upload_artifact(
        artifact_store=store, file_path=path, study_or_trial=db.optuna.get_trial(trial_id), storage=db.optuna
    )


def open_checkpoint(
    db: Database, store: FileSystemArtifactStore, name: str, number: int | None = None
) -> tuple[int, str, BinaryIO]:
    """The checkpoint of trial ``number`` (default: the best complete trial that has one).

    Returns:
        The trial number, the artifact's file name and an open binary reader.
    """
    record = load_record(db, name)
    definition = definition_of(record)
    if number is None:
        complete = [t for t in all_trials(db, record, [TrialState.COMPLETE]) if t.values]
        candidates = ranked(definition, complete)
    else:
        try:
            trial_id = db.optuna.get_trial_id_from_study_id_trial_number(record.optuna_study_id, number)
        except KeyError:
            raise NotFound(f"study {name!r} has no trial {number}", code="trial_not_found") from None
        candidates = [db.optuna.get_trial(trial_id)]
    for trial in candidates:
        metas = [
            m for m in get_all_artifact_meta(trial, storage=db.optuna) if m.filename == CHECKPOINT_FILENAME
        ]
        if metas:
            meta = metas[-1]
            try:
                return trial.number, meta.filename, store.open_reader(meta.artifact_id)
            except ArtifactNotFound:
                raise NotFound(
                    f"the checkpoint of trial {trial.number} of {name!r} is missing from the artifact store "
                    "(is CAVIAR_ARTIFACT_DIR the workers' one?)",
                    code="checkpoint_not_found",
                ) from None
    which = f"trial {number}" if number is not None else "any completed trial"
    raise NotFound(f"no checkpoint stored for {which} of {name!r}", code="checkpoint_not_found")

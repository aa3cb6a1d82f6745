"""Where files stored with trials (checkpoints, logs) live: Optuna artifacts in a private folder."""

from __future__ import annotations

import os
import shutil
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

from caviar.service.db import Database
from caviar.service.store._records import all_trials
from caviar.storage import StudyRecord


class PrivateArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system store, writing files only their owner can read (0600), in a 0700 folder.

    Checkpoints and logs are a trial's results: other accounts on the host have no business there.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._get_filepath(artifact_id)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            shutil.copyfileobj(content_body, handle)


def artifact_store(artifact_dir: str) -> FileSystemArtifactStore:
    """The file-system artifact store under ``CAVIAR_ARTIFACT_DIR``."""
    os.makedirs(artifact_dir, mode=0o700, exist_ok=True)
    return PrivateArtifactStore(artifact_dir)


def artifact_ids(db: Database, record: StudyRecord) -> list[str]:
    """The ids of the Optuna artifacts stored with a study and its trials."""
    try:
        study = optuna.Study(study_name=record.name, storage=db.optuna)
    except KeyError:
        return []
    ids = [meta.artifact_id for meta in get_all_artifact_meta(study, storage=db.optuna)]
    for trial in all_trials(db, record):
        ids += [meta.artifact_id for meta in get_all_artifact_meta(trial, storage=db.optuna)]
    return ids

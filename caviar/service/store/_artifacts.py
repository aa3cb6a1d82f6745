"""Where files stored with trials (checkpoints, logs) live: Optuna artifacts in a private folder."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any, BinaryIO

from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts._upload import ArtifactMeta

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


ARTIFACTS_ATTR_PREFIX = "artifacts:"
"""Where Optuna's ``upload_artifact`` keeps a file's metadata: a study or trial system attribute
(+ the artifact's id)."""


def artifact_metas(system_attrs: Mapping[str, Any]) -> list[ArtifactMeta]:
    """The artifacts recorded in a study's or trial's system attributes, in their order.

    Optuna's ``get_all_artifact_meta`` fails on a record that is not an artifact's (any holder of a
    write token can set system attributes through the Optuna-storage API, ``artifacts:x = null``
    say); such a record names no stored file, so it is left out here.
    """
    found = []
    for key, value in system_attrs.items():
        if not key.startswith(ARTIFACTS_ATTR_PREFIX):
            continue
        try:
            meta: Any = json.loads(value) if isinstance(value, str) else None
            found.append(
                ArtifactMeta(
                    artifact_id=str(meta["artifact_id"]),
                    filename=str(meta["filename"]),
                    mimetype=str(meta["mimetype"]),
                    encoding=meta.get("encoding"),
                )
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return found


def artifact_ids(db: Database, record: StudyRecord) -> list[str]:
    """The ids of the Optuna artifacts stored with a study and its trials."""
    try:
        study_id = db.optuna.get_study_id_from_name(record.name)
    except KeyError:
        return []
    metas = artifact_metas(db.optuna.get_study_system_attrs(study_id))
    for trial in all_trials(db, record):
        metas += artifact_metas(trial.system_attrs)
    return [meta.artifact_id for meta in metas]

"""The CLI's local backend: the domain functions on the database named by the settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from caviar.service import trials
from caviar.service.backend import PAGE
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.errors import parse_model
from caviar.service.schedules import service as schedules
from caviar.service.schedules.schemas import ScheduleUpdate
from caviar.service.store import (
    QUEUE_STATES,
    LeasePolicy,
    artifact_store,
    create_study,
    load_record,
    parse_definition,
)
from caviar.service.studies import service as studies
from caviar.service.studies import steering
from caviar.service.studies.refine import refine
from caviar.service.studies.schemas import RefineRequest, StopRequest, StudyUpdate
from caviar.service.tokens import service as tokens
from caviar.service.tokens.schemas import TokenCreate
from caviar.service.trials import artifacts
from caviar.service.trials.artifacts import open_checkpoint
from caviar.service.trials.enqueue import enqueue
from caviar.service.trials.export import export_trials
from caviar.service.trials.schemas import EnqueueRequest, Importances
from caviar.service.workers import service as workers
from caviar.storage import StudyRecord


class LocalBackend:
    """Every CLI operation on the local database.

    Args:
        settings: where the database and the artifacts are.
    """

    def __init__(self, settings: Settings) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines
        self.settings = settings
        self.db = Database(settings.database_url)

    # ---- studies -------------------------------------------------------------------------

    def check_definitions(self, documents: list[dict[str, Any]]) -> None:
        for doc in documents:
            parse_definition(doc)

    def create_study(self, document: dict[str, Any]) -> dict[str, Any]:
        record = create_study(self.db, parse_definition(document))
        return studies.describe_new(self.db, record).model_dump(mode="json")

    def list_studies(
        self,
        *,
        state: str | None = None,
        tags: Sequence[str] = (),
        limit: int = 100,
        queue: bool = False,
    ) -> dict[str, Any]:
        page = studies.list_studies(
            self.db,
            state=state,
            states=QUEUE_STATES if queue else None,
            tags=tags,
            limit=limit,
            queue_order=queue,
        )
        return page.model_dump(mode="json")

    def study(self, name: str) -> dict[str, Any]:
        return studies.describe(self.db, load_record(self.db, name)).model_dump(mode="json")

    def trials(self, name: str, *, state: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = trials.list_trials(self.db, name, state=state, limit=PAGE, offset=len(items))
            items += [trial.model_dump(mode="json") for trial in page.items]
            if not page.items or len(items) >= page.total:
                return items

    def best(self, name: str) -> dict[str, Any]:
        return trials.best(self.db, name).model_dump(mode="json")

    def refine(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        request = parse_model(RefineRequest, options)
        record = refine(self.db, name, **request.model_dump())
        return studies.describe_new(self.db, record).model_dump(mode="json")

    def update_study(self, name: str, change: dict[str, Any]) -> dict[str, Any]:
        record = steering.update_study(self.db, name, parse_model(StudyUpdate, change))
        return self._study(record)

    def pause_study(self, name: str) -> dict[str, Any]:
        return self._study(studies.pause_study(self.db, name))

    def resume_study(self, name: str) -> dict[str, Any]:
        return self._study(steering.resume_study(self.db, name))

    def stop_study(self, name: str, reason: str | None) -> dict[str, Any]:
        request = parse_model(StopRequest, {"reason": reason})
        return self._study(steering.stop_study(self.db, name, reason=request.reason))

    def delete_study(self, name: str) -> None:
        studies.delete_study(self.db, name, artifacts=artifact_store(self.settings.artifact_dir))

    def enqueue(self, name: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
        request = parse_model(EnqueueRequest, {"trials": trials})
        items = enqueue(self.db, name, request.trials)
        return {"items": [item.model_dump(mode="json") for item in items], "total": len(items)}

    def importances(self, name: str) -> dict[str, Any]:
        return Importances(importances=trials.importances(self.db, name)).model_dump(mode="json")

    def export(self, name: str, fmt: str) -> str:
        return export_trials(self.db, name, "json" if fmt == "json" else "csv")

    def _study(self, record: StudyRecord) -> dict[str, Any]:
        return studies.describe(self.db, record).model_dump(mode="json")

    def checkpoint(self, name: str, number: int | None) -> tuple[int, str, bytes]:
        store = artifact_store(self.settings.artifact_dir)
        found, filename, reader = open_checkpoint(self.db, store, name, number)
        with reader:
            return found, filename, reader.read()

    def artifacts(self, name: str, number: int) -> list[dict[str, Any]]:
        return [item.model_dump(mode="json") for item in artifacts.list_artifacts(self.db, name, number)]

    def download(self, name: str, number: int, filename: str) -> bytes:
        store = artifact_store(self.settings.artifact_dir)
        with artifacts.open_artifact(self.db, store, name, number, filename) as reader:
            return reader.read()

    def workers(self) -> dict[str, Any]:
        page = workers.list_workers(self.db, policy=LeasePolicy.from_settings(self.settings))
        return page.model_dump(mode="json")

    # ---- schedules -----------------------------------------------------------------------

    def add_schedules(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        specs = [schedules.parse_create(doc) for doc in documents]
        for spec in specs:  # every document is checked before any is created
            schedules.check_template(spec.name, spec.template)
        return [schedules.create_schedule(self.db, spec).model_dump(mode="json") for spec in specs]

    def list_schedules(self) -> dict[str, Any]:
        return schedules.list_schedules(self.db, limit=1000).model_dump(mode="json")

    def schedule(self, ref: str) -> dict[str, Any]:
        return schedules.show_schedule(self.db, ref).model_dump(mode="json")

    def update_schedule(self, ref: str, change: dict[str, Any]) -> dict[str, Any]:
        update = parse_model(ScheduleUpdate, change)
        return schedules.update_schedule(self.db, ref, update).model_dump(mode="json")

    def run_schedule(self, ref: str) -> dict[str, Any]:
        return schedules.run_now(self.db, ref).model_dump(mode="json")

    def schedule_runs(self, ref: str, *, limit: int) -> dict[str, Any]:
        return schedules.list_runs(self.db, ref, limit=limit).model_dump(mode="json")

    def delete_schedule(self, ref: str) -> None:
        schedules.delete_schedule(self.db, ref)

    # ---- tokens --------------------------------------------------------------------------

    def create_token(self, scope: str, name: str | None) -> dict[str, Any]:
        request = parse_model(TokenCreate, {"scope": scope, "name": name})
        return tokens.create_token(self.db, request.scope, request.name).model_dump(mode="json")

    def list_tokens(self, *, include_revoked: bool) -> dict[str, Any]:
        return tokens.list_tokens(self.db, include_revoked=include_revoked).model_dump(mode="json")

    def revoke_token(self, token_id: int) -> None:
        tokens.revoke_token(self.db, token_id)

    def close(self) -> None:
        self.db.dispose()

"""Migrations: empty -> head on both backends, coexisting with Optuna's schema, race-free."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta

import optuna
import sqlalchemy as sa
from sqlalchemy import inspect, text

from caviar import storage
from caviar.storage import StudyRecord
from tests.conftest import DatabaseFactory

CAVIAR_TABLES = {
    "caviar_studies",
    "caviar_trial_leases",
    "caviar_schedules",
    "caviar_schedule_runs",
    "caviar_workers",
    "caviar_api_tokens",
}


def test_upgrade_from_empty_to_head(databases: DatabaseFactory) -> None:
    url = databases.empty()
    assert not storage.is_up_to_date(url)
    assert storage.upgrade(url) == storage.head_revision()
    engine = storage.make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert tables >= CAVIAR_TABLES
        assert {"studies", "trials", "trial_params", "version_info", "alembic_version"} <= tables
        assert "caviar_alembic_version" in tables
        with engine.connect() as connection:
            ours = connection.execute(text("SELECT version_num FROM caviar_alembic_version")).scalar_one()
            optunas = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert ours == storage.head_revision()
        assert optunas != ours  # two version tables, no collision
    finally:
        engine.dispose()
    assert storage.is_up_to_date(url)
    assert storage.upgrade(url) == storage.head_revision()  # idempotent


def test_optuna_and_caviar_studies_coexist(databases: DatabaseFactory) -> None:
    from caviar.service.db import Database
    from caviar.service.store import create_study, parse_definition
    from tests.service.helpers import external_study

    url = databases.migrated()
    plain = optuna.create_study(study_name="plain", storage=url)
    plain.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    db = Database(url)
    try:
        create_study(db, parse_definition(external_study("ours")))
        names = {s.study_name for s in optuna.get_all_study_summaries(url)}
        assert names == {"plain", "ours"}
        assert len(optuna.load_study(study_name="plain", storage=url).trials) == 3
    finally:
        db.dispose()
        storage.reset_optuna_storages()


def _upgrade(url: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        queue.put(storage.upgrade(url))
    except Exception as exc:
        queue.put(repr(exc))


def test_concurrent_upgrades_on_a_fresh_database_do_not_race(databases: DatabaseFactory) -> None:
    url = databases.empty()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_upgrade, args=(url, queue)) for _ in range(4)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
    assert results == [storage.head_revision()] * 4


def test_0002_keeps_existing_studies_and_backfills_their_start(databases: DatabaseFactory) -> None:
    """A database at 0001 with a started study: after the upgrade its definition is revision 1 and
    its start time is its first lease's."""
    from alembic import command
    from sqlalchemy import insert

    from caviar.storage._migrate import _alembic_config

    url = databases.empty()
    optuna.storages.RDBStorage(url).engine.dispose()  # Optuna's own schema
    engine = storage.make_engine(url)
    try:
        with engine.connect() as connection:
            command.upgrade(_alembic_config(connection), "0001")
            connection.commit()
        assert storage.current_revision(engine) == "0001"
        metadata = sa.MetaData()
        studies = sa.Table("caviar_studies", metadata, autoload_with=engine)
        leases = sa.Table("caviar_trial_leases", metadata, autoload_with=engine)
        first = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
        row = {"state": "running", "definition": {}, "priority": 0, "objective_kind": "external"}
        with engine.begin() as connection:
            for study_id, name in ((1, "started"), (2, "queued")):
                connection.execute(
                    insert(studies).values(
                        id=study_id,
                        name=name,
                        optuna_study_id=study_id,
                        created_at=first,
                        updated_at=first,
                        **row,
                    )
                )
            for number, offset in ((0, 5), (1, 0), (2, 9)):
                connection.execute(
                    insert(leases).values(
                        trial_id=number + 1, study_id=1, number=number, status="finished", attempt=0,
                        started_at=first + timedelta(minutes=offset), expires_at=first + timedelta(hours=1),
                    )
                )  # fmt: skip
    finally:
        engine.dispose()
    assert storage.upgrade(url) == storage.head_revision()
    from caviar.service.db import Database

    db = Database(url)
    try:
        with db.session() as session:
            started = session.get(StudyRecord, 1)
            queued = session.get(StudyRecord, 2)
            assert started is not None and queued is not None
            assert started.definition_version == 1 and started.started_at == first
            assert queued.started_at is None and queued.stop_reason is None and queued.warm_start is None
    finally:
        db.dispose()


def test_the_migrations_build_the_tables_the_models_describe(databases: DatabaseFactory) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from caviar.storage import Base

    url = databases.migrated()
    engine = storage.make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_object": lambda obj, name, kind, *_: (
                        kind != "table" or name.startswith("caviar_")
                    )
                },
            )
            differences = [d for d in compare_metadata(context, Base.metadata) if not _is_version_table(d)]
    finally:
        engine.dispose()
    assert differences == []


def _is_version_table(difference: object) -> bool:
    """Alembic's own version table is in the database, not in the models."""
    return (
        isinstance(difference, tuple)
        and difference[0] == "remove_table"
        and difference[1].name == "caviar_alembic_version"
    )

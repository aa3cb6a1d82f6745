"""Migrations: empty -> head on both backends, coexisting with Optuna's schema, race-free."""

from __future__ import annotations

import multiprocessing

import optuna
from sqlalchemy import inspect, text

from caviar import storage
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
    from caviar.service.studies.service import create_study, parse_definition
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

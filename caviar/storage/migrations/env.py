"""Alembic environment for caviar's own tables (never Optuna's)."""

from __future__ import annotations

from typing import Any

from alembic import context

from caviar.storage._models import VERSION_TABLE, Base


def _include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    # Optuna's tables share the database: autogenerate must only ever see caviar's.
    if type_ == "table":
        return bool(name and name.startswith("caviar_"))
    return True


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()

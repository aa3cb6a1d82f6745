"""The operator's commands, the only ones that open the database: ``db upgrade``, ``serve``,
``dashboard`` and ``demo`` (which migrates, starts its own service and workers, and watches)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from caviar.cli._common import LogFormatOption, LogLevelOption, fail, say

if TYPE_CHECKING:
    from caviar.service.config import Settings

db_app = typer.Typer(help="Database schema (operator).", no_args_is_help=True)
serve_app = typer.Typer()
"""Holds the root-level operator commands until the root app takes them over (see ``_app``)."""

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="CAVIAR_DATABASE_URL", help="SQLAlchemy URL of the database."),
]
AdminToken = Annotated[
    str | None, typer.Option("--token", envvar="CAVIAR_API_TOKEN", help="Admin API token.")
]
Host = Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")]


def settings_from(database_url: str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment with the command's flags on top; a bad value is one line."""
    # lazy: pydantic-settings and the service's configuration load only for operator commands
    from pydantic import ValidationError

    from caviar.service.config import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if database_url:
        values["database_url"] = database_url
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        fail(f"configuration: {where}: {error['msg'].removeprefix('Value error, ')}")


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None) -> None:
    """Create Optuna's schema and migrate caviar's tables to the newest revision."""
    # lazy: Alembic, SQLAlchemy and Optuna load only for the commands that need them
    from caviar import storage

    url = settings_from(database_url).database_url
    try:
        revision = storage.upgrade(url)
    except Exception as exc:  # a friendly line instead of a traceback
        fail(f"could not migrate {storage.display_url(url)}: {exc.__class__.__name__}: {exc}")
    say(f"database at revision {revision}")


@serve_app.command()
def serve(
    host: Host = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    processes: Annotated[int | None, typer.Option(help="Server processes (default: one per core).")] = None,
    database_url: DatabaseUrl = None,
    token: AdminToken = None,
    no_migrate: Annotated[
        bool, typer.Option("--no-migrate", help="Skip `caviar db upgrade` at start.")
    ] = False,
    wait_for_db: Annotated[
        float | None,
        typer.Option(
            "--wait-for-db",
            min=0,
            help="Seconds to wait for the database at start, retrying with backoff (default 180).",
            show_default=False,
        ),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run the REST API (waiting for the database and migrating it first)."""
    # lazy: uvicorn, FastAPI and the service load only to serve
    from caviar.service.metrics import prepare_multiprocess
    from caviar.service.server import serve as run_server

    settings = settings_from(
        database_url,
        host=host,
        port=port,
        processes=processes,
        api_token=token or None,
        migrate_on_start=False if no_migrate else None,
        wait_for_db_s=wait_for_db,
        log_format=log_format,
        log_level=log_level,
    )
    prepare_multiprocess(settings.processes)
    run_server(settings)


@serve_app.command()
def dashboard(
    host: Host = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    database_url: DatabaseUrl = None,
    token: AdminToken = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run optuna-dashboard on the caviar database on its own port (same auth as the API)."""
    # lazy: uvicorn, the dashboard and the database load only to serve
    import uvicorn

    from caviar.service.dashboard import create_dashboard_app
    from caviar.service.db import Database
    from caviar.service.server import check_bind_allowed
    from caviar.service.timeouts import guarded_protocol

    settings = settings_from(database_url, host=host, port=port, api_token=token or None)
    check_bind_allowed(settings)
    db = Database(settings.database_url)
    say(f"optuna-dashboard on http://{settings.host}:{settings.port}/dashboard")
    try:
        uvicorn.run(
            create_dashboard_app(settings, db),
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            access_log=False,
            http=guarded_protocol(
                keep_alive_s=settings.timeout_keep_alive_s,
                header_s=settings.timeout_headers_s,
                body_s=settings.timeout_body_s,
            ),
            timeout_keep_alive=settings.timeout_keep_alive_s,
        )
    finally:
        db.dispose()


@serve_app.command()
def demo(
    port: Annotated[int, typer.Option(help="API port (the next free one is used if taken).")] = 8000,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", min=1, help="Default: the example's 60.")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="CPU worker slots.")] = 2,
    fuse: Annotated[int, typer.Option(min=1, help="Trials per fused group.")] = 4,
    database_url: DatabaseUrl = None,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Leave the API up at the end.")
    ] = False,
) -> None:
    """Tune the digits MLP end to end: API + workers + the example study, with live progress."""
    # lazy: the demo migrates the database and starts its own service
    from caviar.service.demo import run_demo

    settings = settings_from(database_url)
    raise typer.Exit(
        run_demo(
            settings, port=port, n_trials=n_trials, workers=workers, fuse=fuse, keep_serving=keep_serving
        )
    )

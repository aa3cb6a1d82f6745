"""``caviar token create|list|revoke``: manage API tokens in the local database."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from service.tokens.schemas import Scope

token_app = typer.Typer(help="API tokens (scopes: read, worker, write, admin).", no_args_is_help=True)

_DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="CAVIAR_DATABASE_URL", help="SQLAlchemy URL of the database."),
]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@token_app.command("create")
def token_create(
    scope: Annotated[Scope, typer.Option(help="read | worker | write | admin")],
    name: Annotated[str | None, typer.Option(help="A label for the token (default: the scope).")] = None,
    database_url: _DatabaseUrl = None,
    as_json: _Json = False,
) -> None:
    """Create a token and print its secret (shown once; only its hash is stored)."""
    from pydantic import ValidationError

    from service.cli import console, fail, open_db, print_json
    from service.tokens import service
    from service.tokens.schemas import TokenCreate

    try:
        request = TokenCreate(scope=scope, name=name)
    except ValidationError as exc:
        fail(f"invalid token: {exc.errors()[0]['msg']}")
    db = open_db(database_url)
    try:
        created = service.create_token(db, request.scope, request.name)
    finally:
        db.dispose()
    if as_json:
        print_json(created.model_dump(mode="json"))
        return
    console.print(f"created token {created.id} ({created.name}, scope {created.scope}); shown only once:")
    typer.echo(created.token)


@token_app.command("list")
def token_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Also list revoked tokens.")] = False,
    database_url: _DatabaseUrl = None,
    as_json: _Json = False,
) -> None:
    """List tokens (never their secrets)."""
    from service.cli import console, open_db, print_json
    from service.tokens import service

    db = open_db(database_url)
    try:
        page = service.list_tokens(db, include_revoked=include_revoked)
    finally:
        db.dispose()
    if as_json:
        print_json(page.model_dump(mode="json"))
        return
    table = Table("id", "name", "scope", "prefix", "created", "last used", "revoked")
    for token in page.items:
        table.add_row(
            str(token.id),
            token.name,
            token.scope,
            token.prefix + "...",
            f"{token.created_at:%Y-%m-%d %H:%M}",
            f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "",
            f"{token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "",
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id (see `caviar token list`).")],
    database_url: _DatabaseUrl = None,
) -> None:
    """Revoke a token (servers stop accepting it within a few seconds)."""
    from service.cli import console, fail, open_db
    from service.errors import CaviarError
    from service.tokens import service

    db = open_db(database_url)
    try:
        token = service.revoke_token(db, token_id)
    except CaviarError as exc:
        fail(exc.message)
    finally:
        db.dispose()
    console.print(f"revoked token {token.id} ({token.name})")

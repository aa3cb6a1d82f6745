"""``caviar token create|list|revoke``: API tokens in the local database or, with ``--url``, a service."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from caviar.service.cli_helpers import (
    DatabaseUrl,
    JsonFlag,
    ServiceToken,
    ServiceUrl,
    backend_for,
    console,
    print_json,
    safe,
)
from caviar.service.tokens.schemas import Scope

token_app = typer.Typer(help="API tokens (scopes: read, worker, write, admin).", no_args_is_help=True)


def _day(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else ""


@token_app.command("create")
def token_create(
    scope: Annotated[Scope, typer.Option(help="read | worker | write | admin")],
    name: Annotated[str | None, typer.Option(help="A label for the token (default: the scope).")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a token and print its secret (shown once; only its hash is stored)."""
    with backend_for(url, token, database_url) as backend:
        created = backend.create_token(scope, name)
    if as_json:
        print_json(created)
        return
    console.print(
        f"created token {created['id']} ({safe(created['name'])}, scope {created['scope']}); shown only once:"
    )
    typer.echo(created["token"])


@token_app.command("list")
def token_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Also list revoked tokens.")] = False,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """List tokens (never their secrets)."""
    with backend_for(url, token, database_url) as backend:
        page = backend.list_tokens(include_revoked=include_revoked)
    if as_json:
        print_json(page)
        return
    table = Table("id", "name", "scope", "prefix", "created", "last used", "revoked")
    for item in page["items"]:
        table.add_row(
            str(item["id"]),
            safe(item["name"]),
            item["scope"],
            item["prefix"] + "...",
            _day(item["created_at"]),
            _day(item["last_used_at"]),
            _day(item["revoked_at"]),
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id (see `caviar token list`).")],
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
) -> None:
    """Revoke a token (servers stop accepting it within a few seconds)."""
    with backend_for(url, token, database_url) as backend:
        backend.revoke_token(token_id)
    console.print(f"revoked token {token_id}")

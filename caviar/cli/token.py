"""``caviar token create|list|revoke``: API tokens of a service (an admin token is needed)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from caviar._client import Client
from caviar.cli._common import JsonFlag, api_command, console, output, safe, say

token_app = typer.Typer(help="API tokens (scopes: read, worker, write, admin).", no_args_is_help=True)

Scope = Literal["read", "worker", "write", "admin"]


def _day(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else ""


def _show_created(created: dict[str, Any]) -> None:
    say(
        f"created token {created['id']} ({safe(created['name'])}, scope {created['scope']}); shown only once:"
    )
    typer.echo(created["token"])


def _show_tokens(page: dict[str, Any]) -> None:
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


@api_command(token_app, "create")
def token_create(
    api: Client,
    scope: Annotated[Scope, typer.Option(help="read | worker | write | admin")],
    name: Annotated[str | None, typer.Option(help="A label for the token (default: the scope).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a token and print its secret (shown once; only its hash is stored)."""
    output(api.create_token(scope, name), as_json, _show_created)


@api_command(token_app, "list")
def token_list(
    api: Client,
    include_revoked: Annotated[bool, typer.Option("--all", help="Also list revoked tokens.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """List tokens (never their secrets)."""
    output(api.tokens(include_revoked=include_revoked), as_json, _show_tokens)


@api_command(token_app, "revoke")
def token_revoke(
    api: Client,
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id (see `caviar token list`).")],
) -> None:
    """Revoke a token (servers stop accepting it within a few seconds)."""
    api.revoke_token(token_id)
    say(f"revoked token {token_id}")

"""What every ``caviar`` command shares: options, output, errors, and where its data comes from."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from caviar._errors import CaviarApiError
from caviar._logging import LogFormat, LogLevel
from caviar._yaml import load_all
from caviar.service.backend import Backend
from caviar.service.config import Settings
from caviar.service.errors import CaviarError
from caviar.service.remote import RemoteBackend

DOMAIN_ERRORS = (CaviarError, CaviarApiError)
"""What a command reports as one line: refusals of the local domain or of the remote service."""

console = Console()
err_console = Console(stderr=True)

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="CAVIAR_DATABASE_URL", help="SQLAlchemy URL of the database."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ServiceUrl = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="CAVIAR_URL", help="Talk to this caviar service over REST instead of the database."
    ),
]
ServiceToken = Annotated[
    str | None, typer.Option("--token", envvar="CAVIAR_API_TOKEN", help="Bearer token for --url.")
]

LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        envvar="CAVIAR_LOG_FORMAT",
        case_sensitive=False,
        help="Log lines: text, or json (one JSON object a line). Default: text.",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        envvar="CAVIAR_LOG_LEVEL",
        case_sensitive=False,
        help="Least severe level logged (the access log is info). Default: info.",
        show_default=False,
    ),
]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: object) -> str:
    """``text`` from the service or a file, for the terminal: control characters (escape sequences)
    shown as ``\\xNN`` and Rich markup (``[bold]``) shown as written, never interpreted."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one error line and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {safe(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def settings_from(database_url: str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment with CLI flags on top."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if database_url:
        values["database_url"] = database_url
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        fail(f"configuration: {where}: {error['msg'].removeprefix('Value error, ')}")


@contextlib.contextmanager
def backend_for(url: str | None, token: str | None, database_url: str | None) -> Iterator[Backend]:
    """The remote service with ``--url``, else the local database; an error becomes one line."""
    backend: Backend
    if url:
        backend = RemoteBackend(url, token)
    else:
        # lazy: the local backend imports SQLAlchemy and Optuna, which a remote command never needs
        from caviar.service.local import LocalBackend

        backend = LocalBackend(settings_from(database_url))
    try:
        yield backend
    except DOMAIN_ERRORS as exc:
        fail(exc.message)
    finally:
        backend.close()


def read_documents(path: Path) -> list[dict[str, Any]]:
    """One or several definitions from a YAML/JSON file (multi-document YAML or a list)."""
    if str(path) == "-":
        text = sys.stdin.read()
    else:
        if not path.exists():
            fail(f"{path}: no such file")
        text = path.read_text()
    try:
        documents = [doc for doc in load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        fail(f"{path}: not valid YAML/JSON ({exc.__class__.__name__})")
    if len(documents) == 1 and isinstance(documents[0], list):
        documents = documents[0]
    if not documents or not all(isinstance(doc, dict) for doc in documents):
        fail(f"{path}: expected a mapping (or a list of mappings) per definition")
    return documents

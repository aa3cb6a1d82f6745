"""What every ``caviar`` command shares: its options, its output, and its errors.

Commands other than the operator's (``serve``, ``dashboard``, ``db upgrade``, ``demo``) talk to a
caviar service over REST through :class:`caviar.Client`; :func:`api_command` gives each of them
``--url``/``--token`` and a client, and turns every refusal into one line on stderr: exit 2 when
no service answers at the URL, exit 1 for anything else.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from caviar import _http
from caviar._client import Client
from caviar._errors import CaviarApiError
from caviar._logging import LogFormat, LogLevel
from caviar._yaml import load_all

console = Console()
err_console = Console(stderr=True)

UNREACHABLE_EXIT = 2
"""The exit status of a command that found no service at its URL."""

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ServiceUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="CAVIAR_URL",
        help=f"The caviar service (default: {_http.DEFAULT_URL}, a local `caviar serve`).",
        show_default=False,
    ),
]
ServiceToken = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="CAVIAR_API_TOKEN", help="Bearer token of the service.", show_default=False
    ),
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
    """Print one error line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {safe(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def say(text: str) -> None:
    """One line for people on stdout (markup allowed; values passed through :func:`safe`)."""
    console.print(text, highlight=False)


def output(data: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """Print ``data`` as JSON with ``--json``, else as ``show`` renders it for people."""
    if as_json:
        print_json(data)
    else:
        show(data)


def _where(url: str | None) -> str:
    """The service's URL and how it was chosen, for the unreachable-service line."""
    if url is None:
        return f"{_http.DEFAULT_URL} (the default URL"
    if os.environ.get("CAVIAR_URL") == url:
        return f"{url} (the URL from CAVIAR_URL"
    return f"{url} (the URL from --url"


@contextmanager
def service(url: str | None, token: str | None) -> Iterator[Client]:
    """A client of the service at ``url``; any refusal of the service becomes one line and an exit.

    Raises:
        typer.Exit: 2 when nothing answers at the URL, 1 for an error answer.
    """
    # A person waits at the terminal: a service that never answered is reported at once; one
    # that answered and then drops out (a restart during `study watch`) is retried briefly.
    client = Client(url or _http.DEFAULT_URL, token, retry_s=10.0, wait_for_service=False)
    try:
        yield client
    except CaviarApiError as exc:
        if exc.code == "unreachable":
            why = exc.message.rpartition(": ")[2]
            if why == "UnsupportedProtocol":
                why += ": a URL starts with http:// or https://"
            fail(
                f"no caviar service at {_where(url)}; {why}). Start one with `caviar serve`, "
                "or point to one with --url URL or CAVIAR_URL.",
                UNREACHABLE_EXIT,
            )
        fail(exc.message)
    except json.JSONDecodeError:
        fail(f"{client.url} answered, but not as a caviar service does (no JSON): is the URL right?")
    finally:
        client.close()


def api_command(
    app: typer.Typer, name: str, *, help: str | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command that talks to the service: its first parameter, ``api``, is a client.

    The command line sees the function's other parameters plus ``--url`` and ``--token``; the
    function runs with a connected :class:`caviar.Client` and the service's refusals become one
    line (see :func:`service`). ``help`` replaces the function's docstring as the command's help.
    """

    def register(func: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(func, eval_str=True)
        own = list(signature.parameters.values())
        if not own or own[0].name != "api":
            raise TypeError(f"{func.__name__}: the first parameter of an api_command is `api`")
        keyword = inspect.Parameter.KEYWORD_ONLY
        shown = [
            *own[1:],
            inspect.Parameter("url", keyword, default=None, annotation=ServiceUrl),
            inspect.Parameter("token", keyword, default=None, annotation=ServiceToken),
        ]

        @functools.wraps(func)
        def command(*args: Any, url: str | None = None, token: str | None = None, **kwargs: Any) -> None:
            with service(url, token) as api:
                func(api, *args, **kwargs)

        command.__signature__ = signature.replace(parameters=shown)  # type: ignore[attr-defined]
        app.command(name, help=help)(command)
        return func

    return register


def read_documents(path: Path) -> list[dict[str, Any]]:
    """One or several mappings from a YAML/JSON file (multi-document YAML or a list); ``-`` is stdin."""
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


def create_all(
    documents: list[dict[str, Any]],
    create: Callable[[dict[str, Any]], dict[str, Any]],
    what: str,
    as_json: bool,
    show: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Create one thing per document, in order, and print them (JSON: one object, or a list when
    the file held several); on a refusal, say which were created before it."""
    created: list[dict[str, Any]] = []
    try:
        for doc in documents:
            created.append(create(doc))
    except CaviarApiError:
        if created:
            names = ", ".join(str(item["name"]) for item in created)
            err_console.print(f"created {what} {safe(names)} before the error", highlight=False)
        raise
    output(created if len(created) > 1 else created[0], as_json, lambda _: show(created))

"""The root of the ``caviar`` command line: every command group, registered in one place."""

from __future__ import annotations

from typing import Annotated

import typer

import caviar
from caviar.cli._common import say
from caviar.cli.doctor import doctor
from caviar.cli.gradcheck import gradcheck
from caviar.cli.queue import queue_app
from caviar.cli.schedule import schedule_app
from caviar.cli.serve import db_app, serve_app
from caviar.cli.study import study_app
from caviar.cli.token import token_app
from caviar.worker._cli import worker

app = typer.Typer(
    name="caviar", help="caviar: hyperparameter tuning service for PyTorch models.", no_args_is_help=True
)
app.add_typer(study_app, name="study")
app.add_typer(schedule_app, name="schedule")
app.add_typer(token_app, name="token")
app.add_typer(queue_app)  # queue, workers
app.command()(worker)
app.add_typer(serve_app)  # serve, dashboard, demo: the operator's
app.add_typer(db_app, name="db")
app.command()(gradcheck)
app.command()(doctor)


def _print_version(value: bool) -> None:
    if value:
        say(f"caviar {caviar.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """caviar: hyperparameter tuning service for PyTorch models.

    Every command but the operator's (serve, dashboard, db upgrade, demo) talks to a caviar service
    over REST: --url or CAVIAR_URL, else a local `caviar serve` at http://127.0.0.1:8000.
    """


def main() -> None:
    """Console-script entry point."""
    app()

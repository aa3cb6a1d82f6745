"""The ``caviar`` command line: a module per command group, all of them clients of the REST API.

Only the operator's commands (``serve``, ``dashboard``, ``db upgrade``, ``demo``) open the database;
every other command reaches a service through :class:`caviar.Client` (``--url``/``CAVIAR_URL``,
else ``http://127.0.0.1:8000``). ``caviar worker`` is the worker package's own command
(``caviar.worker._cli``), registered here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point (``caviar``)."""
    # The command modules load on use, so that `caviar.worker._cli` can import the shared options
    # of `caviar.cli._common` without a circle through this package's root.
    # lazy: see above
    from caviar.cli._app import main as run

    run()


def __getattr__(name: str) -> Any:
    """``caviar.cli.app``: the typer application (built on first access)."""
    if name == "app":
        # lazy: see main()
        from caviar.cli._app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""``python -m caviar.worker._run_python package.module:function``: one trial of a ``kind: python`` study.

Run by a worker in a child process (with ``CAVIAR_TRIAL`` set): imports the function from the
worker's working directory or an installed package, calls it with ``caviar.current_trial()`` and
hands its return value (the objective value, or one value per objective) back to the worker.
``caviar.TrialPruned`` or ``optuna.TrialPruned`` tells the trial pruned; any other exception fails it
with its traceback. The function may be an unmodified Optuna objective.

An entrypoint that cannot be loaded (its module fails to import, or has no such function) is a
setup error: the traceback goes to stderr and the exit status is :data:`SETUP_ERROR_EXIT`, which
the worker turns into a ``setup error:`` failure that pauses the study.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import caviar
from caviar._client import is_pruned

SETUP_ERROR_EXIT = 86
"""The exit status of a trial whose entrypoint could not be loaded (a setup error, not the trial's)."""


def load(entrypoint: str) -> Callable[[caviar.Trial], Any]:
    """The function named ``package.module:function``."""
    module_name, _, function_name = entrypoint.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SystemExit(f"caviar: {entrypoint}: {module_name} has no function {function_name!r}")
    return function


def load_entrypoint(argv: list[str], runner: str) -> Callable[..., Any] | int:
    """The function named by the one argument, or the exit status after saying why it cannot be
    loaded (2: usage; ``SETUP_ERROR_EXIT``: no such function, or its module fails to import)."""
    if len(argv) != 1:
        print(f"usage: python -m {runner} package.module:function", file=sys.stderr)
        return 2
    try:
        return load(argv[0])
    except SystemExit as exc:  # no such function
        print(f"caviar: setup error: {exc}", file=sys.stderr)
        return SETUP_ERROR_EXIT
    except Exception as exc:  # the module (or one it imports) fails to import
        traceback.print_exc()
        print(f"caviar: setup error: cannot import {argv[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return SETUP_ERROR_EXIT


def main(argv: list[str]) -> int:
    objective = load_entrypoint(argv, "caviar.worker._run_python")
    if isinstance(objective, int):
        return objective
    trial = caviar.current_trial()
    try:
        result = objective(trial)
    except Exception as exc:
        if not is_pruned(exc):  # caviar.TrialPruned or optuna.TrialPruned
            raise
        if not trial.finished:
            trial.prune()
        return 0
    if trial.finished:  # the function told (or pruned) the trial itself
        return 0
    if result is None:
        print(f"caviar: {argv[0]} returned None; return the objective value", file=sys.stderr)
        return 1
    trial.tell(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The parts of an objective that run user code: how a worker reads a program's metrics
(``metrics``), which files of a trial's directory it stores (``outputs``), the command's
placeholders, and the environment (which names it may set, and what read scope sees)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, model_validator

from caviar import _code_rules as code_rules
from caviar.service.definition._parts import _Strict

METRICS_FILE = "metrics.jsonl"
"""Where a ``metrics: {format: jsonl}`` program writes its JSON lines by default (in its trial directory)."""


class MetricsSpec(_Strict):
    """How a worker reads the metrics of a ``kind: command`` program from its own output.

    ``stdout`` (the default): ``name=value`` or ``name: value`` pairs for the study's metric names
    (Katib's StdOut convention), with the step from a ``step``/``epoch`` pair on the same line (else
    a count of reports). ``regex``: ``pattern`` with a named group ``value`` (and optionally
    ``step``), matched against each line of standard output. ``jsonl``: a JSON-lines ``file`` the
    program appends to in its working directory, one object per report (``{"step": 3,
    "val_acc": 0.91}``). Each parsed line is reported (the pruner may stop the program); the trial's
    value is the last one reported unless the program prints ``caviar-result``.
    """

    format: Literal["stdout", "regex", "jsonl"] = "stdout"
    pattern: str | None = Field(
        default=None, max_length=1024, description="regex: a pattern with named groups value (and step)."
    )
    file: str | None = Field(
        default=None,
        max_length=256,
        description=f"jsonl: the file, relative to the trial's directory (default {METRICS_FILE}).",
    )

    @model_validator(mode="after")
    def _check(self) -> MetricsSpec:
        if self.format == "regex":
            if not self.pattern:
                raise ValueError("metrics.pattern: format regex needs a pattern")
            try:
                groups = re.compile(self.pattern).groupindex
            except re.error as exc:
                raise ValueError(f"metrics.pattern: not a valid regular expression: {exc}") from None
            if "value" not in groups:
                raise ValueError(
                    "metrics.pattern: needs a named group (?P<value>...) (and optionally (?P<step>...))"
                )
        elif self.pattern is not None:
            raise ValueError("metrics.pattern: only for format regex")
        if self.format == "jsonl":
            path = PurePosixPath(self.file or METRICS_FILE)
            if path.is_absolute() or ".." in path.parts or "\\" in str(path):
                raise ValueError("metrics.file: a relative path inside the trial's directory")
        elif self.file is not None:
            raise ValueError("metrics.file: only for format jsonl")
        return self


def check_output_glob(index: int, pattern: str) -> None:
    """Refuse an ``outputs`` glob that could reach outside the trial's directory.

    Raises:
        ValueError: ``outputs.<index>: ...`` for an absolute path, a ``..`` part, a backslash, an
            empty part or a NUL character.
    """
    path = PurePosixPath(pattern)
    if "\x00" in pattern or "\\" in pattern:
        raise ValueError(f"outputs.{index}: may not contain NUL characters or backslashes")
    if path.is_absolute() or pattern.startswith("~"):
        raise ValueError(f"outputs.{index}: a glob relative to the trial's directory, not {pattern!r}")
    if ".." in path.parts or path.parts in ((), (".",)):
        raise ValueError(f"outputs.{index}: a glob of files inside the trial's directory, not {pattern!r}")


def command_placeholders(command: list[str]) -> set[str]:
    """The ``{name}`` placeholders of a command's arguments (``{{`` and ``}}`` are literal braces).

    Raises:
        ValueError: ``objective.command.<i>: ...`` for an argument with a placeholder that is not a
            plain ``{name}`` (a conversion like ``{lr!r}``, a format spec like ``{lr:d}``, ...).
    """
    names: set[str] = set()
    for index, argument in enumerate(command):
        try:
            names.update(code_rules.placeholders(argument))
        except ValueError as exc:
            raise ValueError(f"objective.command.{index}: {exc}") from None
    return names


def check_env_names(env: dict[str, str]) -> None:
    """Refuse loader, interpreter, shell and caviar variables in an objective's ``env``.

    Raises:
        ValueError: ``objective.env.<NAME>: ...`` for the first refused name.
    """
    for name in env:
        why = code_rules.env_refusal(name)
        if why is not None:
            shown = name if re.fullmatch(r"[A-Za-z0-9_]{1,128}", name) else "name"
            raise ValueError(f"objective.env.{shown}: {name!r} {why}")


REDACTED = "<redacted>"


def redact_env(definition: dict[str, Any]) -> dict[str, Any]:
    """A copy of a definition (or schedule template) whose ``objective.env`` keeps its names only.

    What read scope sees: a study's environment may carry credentials for the program it runs.
    """
    objective = definition.get("objective")
    if not isinstance(objective, dict) or not objective.get("env"):
        return definition
    env = objective["env"]
    hidden = {name: REDACTED for name in env} if isinstance(env, dict) else REDACTED
    return {**definition, "objective": {**objective, "env": hidden}}

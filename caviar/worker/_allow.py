"""What user code a worker runs, and the environment it runs in.

``caviar worker --allow-code SPEC`` (repeatable) names the code this host's operator allows:

* ``python:PREFIX``: ``kind: python`` entrypoints whose module is ``PREFIX`` or lies under it
  (``python:mypkg`` allows ``mypkg:f`` and ``mypkg.train:f``; ``python:mypkg.`` only the
  submodules); ``python:mypkg.train:main`` allows exactly that function.
* ``command:PROGRAM [ARG ...]``: ``kind: command`` studies whose command starts with exactly these
  words (shell-split): ``PROGRAM`` is an absolute path (``command:/usr/bin/python3``) or a bare name
  found on the worker's ``PATH`` (``command:python``); arguments after it pin the script
  (``command:python train.py``).
* ``all``: any code at all (the meaning of the old bare ``--allow-code``), with a warning.

Everything else is refused: the worker does not run it, and hands one trial of that study back
with the reason (visible on the study's trials), once per study and definition it sees.

The child's environment is clean: only :data:`DEFAULT_PASS_ENV` and ``--pass-env`` names of the
worker's own environment (never ``CAVIAR_*`` and never the worker's token), then the objective's
``env`` (whose names the service and the worker both check), then caviar's own variables.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from caviar import _code_rules

CODE_KINDS: Final = ("python", "command")
DEFAULT_PASS_ENV: Final[tuple[str, ...]] = (
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TERM",
    "PATH",
    "CUDA_*",
    "NVIDIA_*",
)
"""Variables of the worker's environment every child gets (shell patterns; ``--pass-env`` adds)."""
NEVER_PASSED: Final = "CAVIAR_*"
"""The worker's own settings (its token among them) never reach a child."""
SPEC_HELP: Final = (
    "--allow-code takes python:MODULE_PREFIX, command:PROGRAM (an absolute path or a bare name, "
    "optionally followed by fixed arguments) or all"
)
_MODULE: Final = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\.|:[A-Za-z_][A-Za-z0-9_]*)?$"
)
_ENV_PATTERN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")


@dataclass(frozen=True)
class AllowList:
    """The code a worker may run.

    Attributes:
        any_code: ``all`` was given: everything runs.
        modules: ``python:`` prefixes (or exact ``module:function`` entrypoints).
        commands: ``command:`` word lists a command must start with.
    """

    any_code: bool = False
    modules: tuple[str, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def parse(cls, specs: Iterable[str]) -> AllowList:
        """Read ``--allow-code`` values.

        Raises:
            ValueError: a value that is none of the forms (the message says which are).
        """
        any_code, modules, commands = False, [], []
        for spec in specs:
            kind, sep, rest = spec.partition(":")
            if spec.strip() == "all":
                any_code = True
            elif sep and kind == "python" and _MODULE.match(rest):
                modules.append(rest)
            elif sep and kind == "command":
                try:
                    words = tuple(shlex.split(rest))
                except ValueError as exc:
                    raise ValueError(f"--allow-code {spec!r}: {exc}") from None
                if not words or ("/" in words[0] and not words[0].startswith("/")):
                    raise ValueError(f"--allow-code {spec!r}: the program is an absolute path or a bare name")
                commands.append(words)
            else:
                raise ValueError(f"--allow-code {spec!r}: {SPEC_HELP}")
        return cls(any_code, tuple(modules), tuple(commands))

    @property
    def kinds(self) -> list[str]:
        """The objective kinds this list can allow anything of."""
        if self.any_code:
            return list(CODE_KINDS)
        return [k for k, allowed in (("python", self.modules), ("command", self.commands)) if allowed]

    def refusal(self, objective: Mapping[str, Any]) -> str | None:
        """Why this worker will not run ``objective`` (None: it may)."""
        kind = objective.get("kind")
        for name in objective.get("env") or {}:
            why = _code_rules.env_refusal(str(name))
            if why is not None:
                return f"objective.env.{name} {why}"
        if kind == "command":
            command = [str(word) for word in objective.get("command") or []]
            for index, argument in enumerate(command):
                try:
                    _code_rules.placeholders(argument)
                except ValueError as exc:
                    return f"objective.command.{index}: {exc}"
            if self.any_code or any(_starts_with(command, words) for words in self.commands):
                return None
            shown = " ".join(shlex.quote(word) for word in command[:3])
            return (
                f"command {shown!r} is not on this worker's allow-list (start it with "
                f"--allow-code 'command:{command[0] if command else 'PROGRAM'}' to run it)"
            )
        if kind == "python":
            entrypoint = str(objective.get("entrypoint") or "")
            if self.any_code or any(_module_allowed(entrypoint, prefix) for prefix in self.modules):
                return None
            module = entrypoint.partition(":")[0]
            return (
                f"entrypoint {entrypoint!r} is not on this worker's allow-list (start it with "
                f"--allow-code 'python:{module}' to run it)"
            )
        return None


def _starts_with(command: Sequence[str], words: Sequence[str]) -> bool:
    return len(command) >= len(words) and list(command[: len(words)]) == list(words)


def _module_allowed(entrypoint: str, prefix: str) -> bool:
    module = entrypoint.partition(":")[0]
    if ":" in prefix:
        return entrypoint == prefix
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


def check_pass_env(names: Iterable[str]) -> tuple[str, ...]:
    """Validate ``--pass-env`` values: a variable name, or a name prefix ending in ``*``.

    Raises:
        ValueError: a malformed one, or one that names caviar's own variables.
    """
    checked = []
    for name in names:
        if not _ENV_PATTERN.match(name):
            raise ValueError(f"--pass-env {name!r}: a variable name, or a prefix ending in * (LC_*)")
        if name.upper().startswith("CAVIAR") or fnmatch.fnmatchcase("CAVIAR_API_TOKEN", name.upper()):
            raise ValueError(f"--pass-env {name!r}: caviar's own variables (and tokens) never reach a child")
        checked.append(name)
    return tuple(checked)


def child_environment(
    environ: Mapping[str, str], pass_env: Iterable[str] = (), *, secrets: Iterable[str | None] = ()
) -> dict[str, str]:
    """The part of the worker's environment a child gets.

    Args:
        environ: the worker's environment.
        pass_env: more names (or ``PREFIX*`` patterns) to pass beyond :data:`DEFAULT_PASS_ENV`.
        secrets: values that never pass, whatever their variable's name (the worker's token).
    """
    patterns = (*DEFAULT_PASS_ENV, *pass_env)
    hidden = {s for s in secrets if s}
    return {
        name: value
        for name, value in environ.items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        and not fnmatch.fnmatchcase(name.upper(), NEVER_PASSED)
        and value not in hidden
    }


def objective_digest(objective: Mapping[str, Any]) -> str:
    """A fingerprint of what an objective runs (its code, command and environment)."""
    return hashlib.sha256(json.dumps(objective, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pin_of(study: Mapping[str, Any]) -> dict[str, str]:
    """What ``--study`` pins of a study: its identity (created_at) and its objective's fingerprint."""
    return {
        "created_at": str(study.get("created_at")),
        "objective": objective_digest(study["definition"]["objective"]),
    }


def pin_refusal(name: str, pinned: Mapping[str, str], now: Mapping[str, str]) -> str | None:
    """Why a study seen now no longer is the one this worker was started for (None: it is)."""
    if pinned["created_at"] != now["created_at"]:
        return (
            f"study {name} was deleted and created again since this worker started (created "
            f"{pinned['created_at']}, now {now['created_at']}): restart the worker to consent to the new one"
        )
    if pinned["objective"] != now["objective"]:
        return (
            f"the objective of study {name} changed since this worker started: restart the worker to "
            "consent to the new code"
        )
    return None


def describe(allow: AllowList) -> str:
    """One line for the start-up log."""
    if allow.any_code:
        return "ANY code (--allow-code all)"
    parts = [f"python:{m}" for m in allow.modules] + [f"command:{shlex.join(c)}" for c in allow.commands]
    return ", ".join(parts) if parts else "no code"


def interpreter_path(path: str | None, executable: str) -> str:
    """``PATH`` with the worker's interpreter first (``python`` in a command means the worker's own)."""
    return os.pathsep.join([os.path.dirname(executable), *([path] if path else [])])

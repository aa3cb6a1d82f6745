"""Rules for user code that both the service (at create) and the worker (before a run) apply.

* Command placeholders are plain ``{name}`` fields: no conversion (``{lr!r}``), no format spec
  (``{lr:d}``, ``{number:>1000000000}``), no attribute or index (``{a.b}``, ``{a[0]}``); ``{{`` and
  ``}}`` are literal braces. Filling one in is ``str(value)``, never :meth:`str.format`.
* An objective's ``env`` may not set loader, interpreter or shell variables
  (:data:`FORBIDDEN_ENV`), nor caviar's own.

Standard library only: the worker imports it without the service.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any, Final

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

FORBIDDEN_ENV: Final[tuple[str, ...]] = (
    # the dynamic loader (glibc, macOS) and the C library
    "LD_*",
    "DYLD_*",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "MALLOC_*",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    # where programs are found, and shells
    "PATH",
    "CDPATH",
    "ENV",
    "BASH_ENV",
    "BASH_FUNC_*",
    "BASHOPTS",
    "SHELLOPTS",
    "IFS",
    "PS4",
    "PROMPT_COMMAND",
    "GLOBIGNORE",
    # interpreters that read code or options from their environment
    "PYTHON*",
    "PERL*",
    "RUBY*",
    "GEM_*",
    "NODE_*",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "LUA_*",
    "TCLLIBPATH",
    "R_PROFILE*",
    "R_ENVIRON*",
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "GIT_*",
    # what the worker sets itself
    "CAVIAR_*",
    "CUDA_VISIBLE_DEVICES",
)
"""Names (shell patterns, matched without regard to case) an objective's ``env`` may not set."""


def env_refusal(name: str) -> str | None:
    """Why an objective's ``env`` may not set ``name`` (None: it may)."""
    if not _NAME.fullmatch(name) or len(name) > 128:
        return "is not a valid variable name (letters, digits and _, not starting with a digit)"
    upper = name.upper()
    for pattern in FORBIDDEN_ENV:
        if fnmatch.fnmatchcase(upper, pattern):
            return (
                f"may not be set by a study (it matches {pattern}: loader, interpreter, shell and "
                "caviar's own variables are refused)"
            )
    return None


def template_fields(argument: str) -> list[str | tuple[str]]:
    """An argument as its pieces: literal text (``str``) and placeholders (a 1-tuple of the name).

    Raises:
        ValueError: a brace that is neither ``{name}``, ``{{`` nor ``}}``.
    """
    pieces: list[str | tuple[str]] = []
    literal: list[str] = []
    i, n = 0, len(argument)
    while i < n:
        char = argument[i]
        if char == "{":
            if argument.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = argument.find("}", i + 1)
            name = argument[i + 1 : end] if end >= 0 else argument[i + 1 :]
            if end < 0 or not _NAME.fullmatch(name):
                shown = argument[i : min(n, i + 40) if end < 0 else min(end + 1, i + 40)]
                raise ValueError(
                    f"placeholder {shown!r} must be a plain {{name}} (no conversion, format spec, "
                    "index or attribute; write {{ and }} for literal braces)"
                )
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append((name,))
            i = end + 1
        elif char == "}":
            if not argument.startswith("}}", i):
                raise ValueError("a single '}' (write }} for a literal brace)")
            literal.append("}")
            i += 2
        else:
            literal.append(char)
            i += 1
    if literal:
        pieces.append("".join(literal))
    return pieces


def placeholders(argument: str) -> list[str]:
    """The names of an argument's placeholders, in order (see :func:`template_fields`)."""
    return [piece[0] for piece in template_fields(argument) if isinstance(piece, tuple)]


def fill(argument: str, values: Mapping[str, Any]) -> str:
    """The argument with each ``{name}`` replaced by ``str(values[name])``.

    Raises:
        ValueError: a malformed placeholder.
        KeyError: a placeholder with no value.
    """
    return "".join(
        piece if isinstance(piece, str) else str(values[piece[0]]) for piece in template_fields(argument)
    )

"""Bounded input types shared by every request schema: nothing unbounded or unprintable is written.

PostgreSQL cannot store a NUL character and its integers are 32 or 64 bits: a request that
carries one must be refused (422) before anything is written, never fail half-way (500).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NUL = "\x00"

INT32_MAX = 2**31 - 1
"""Trial numbers, ids and counts are stored as 32-bit integers."""
MAX_OFFSET = 1_000_000_000
"""The largest ``offset`` of a list request."""


def printable(value: str) -> str:
    """Refuse control characters (NUL, escape sequences, newlines) in an identifier."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def no_nul(value: str) -> str:
    """Refuse the NUL character in free text (PostgreSQL cannot store it)."""
    if _NUL in value:
        raise ValueError("must not contain NUL characters")
    return value


def nul_path(data: Any, path: str = "") -> str | None:
    """The dotted path of the first string (key or value) in ``data`` that holds a NUL, if any."""
    if isinstance(data, str):
        return path or "body" if _NUL in data else None
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _NUL in key:
                return where
            found = nul_path(value, where)
            if found:
                return found
    if isinstance(data, list):
        for index, value in enumerate(data):
            found = nul_path(value, f"{path}[{index}]")
            if found:
                return found
    return None


Identifier = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(printable)]
"""A worker id, a request id: 1-128 printable characters."""

Text = Annotated[str, Field(max_length=2000), AfterValidator(no_nul)]
"""Free text (a failure reason): at most 2000 characters, no NUL."""

TagText = Annotated[str, Field(max_length=256), AfterValidator(no_nul)]
"""A study tag's key or value: at most 256 characters, no NUL."""

Credential = Annotated[str, Field(max_length=512)]
"""A trial's credential as a body field (what its ask answered): at most 512 characters."""

TrialNumber = Annotated[int, Field(ge=0, le=INT32_MAX)]

"""Domain errors. The HTTP layer maps them onto status codes in one handler."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

_PARAM_TAGS = {"float", "int", "categorical"}
_TYPE_TAG = re.compile(r"^(function-\w+\[.*\]|constrained-\w+|str|int|float|bool|none|\[key\])$")
_NAMED_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): (.+)$", re.DOTALL)
"""A model-level validator's message that starts by naming its field (``"metric: ..."``)."""


class CaviarError(Exception):
    """Base of every error caviar's domain code raises on purpose.

    Attributes:
        code: snake_case error code for the API's error envelope.
        status: the HTTP status the API answers with.
        details: structured details (for validation: one entry per field).
    """

    code = "error"
    status = 400

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Sequence[Any] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = list(details or [])
        self.retry_after_s = retry_after_s
        """Seconds after which repeating the request may succeed (the ``Retry-After`` header)."""


class NotFound(CaviarError):
    code = "not_found"
    status = 404


class Conflict(CaviarError):
    code = "conflict"
    status = 409


class InvalidInput(CaviarError):
    code = "validation_error"
    status = 422


class RateLimited(CaviarError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class Unavailable(CaviarError):
    """The service cannot answer this request now (retry after ``retry_after_s``)."""

    code = "unavailable"
    status = 503

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class Unauthorized(CaviarError):
    code = "unauthorized"
    status = 401


class Forbidden(CaviarError):
    code = "forbidden"
    status = 403


def field_path(loc: Sequence[Any]) -> str:
    """A pydantic error location as a dotted field path (``search_space.lr.low``).

    The ``body`` prefix of request validation and the discriminator tags of search-space
    parameters are left out.
    """
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    if len(parts) >= 3 and parts[0] == "search_space" and parts[2] in _PARAM_TAGS:
        del parts[2]
    # union members and validators show up as tags like "function-after[no_nul(), constrained-str]"
    return ".".join(p for p in parts if not _TYPE_TAG.match(p))


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic errors as ``[{field, message, type}]``; messages lose pydantic's 'Value error, ' prefix."""
    details = []
    for error in errors:
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        field = field_path(error.get("loc", ()))
        named = _NAMED_FIELD.match(message) if not field else None
        if named:  # a check across fields names the one it refuses: that is the detail's field
            field, message = named.group(1), named.group(2)
        details.append({"field": field, "message": message, "type": error.get("type")})
    return details


def invalid_from_pydantic(errors: Sequence[Any], *, prefix: str = "") -> InvalidInput:
    """An :class:`InvalidInput` whose message names the first failing field."""
    details = validation_details(errors)
    if prefix:
        for detail in details:
            detail["field"] = f"{prefix}.{detail['field']}" if detail["field"] else prefix
    first = details[0] if details else {"field": prefix, "message": "invalid input"}
    where = first["field"] or "body"
    return InvalidInput(f"{where}: {first['message']}", details=details)


_Model = TypeVar("_Model", bound=BaseModel)


def parse_model(model: type[_Model], data: Any, *, prefix: str = "") -> _Model:
    """Validate ``data`` as ``model``; an :class:`InvalidInput` naming the field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc.errors(), prefix=prefix) from None

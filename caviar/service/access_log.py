"""The access log: one record per HTTP request on the ``caviar.access`` logger.

Written by :class:`~caviar.service.metrics.RequestMiddleware` once the response is sent, at level
INFO (WARNING for a 5xx). Its structured fields: ``method``, ``route`` (the route template, such
as ``/api/v1/studies/{name}/trials/ask``; ``dashboard`` or ``unmatched`` otherwise), ``status``,
``duration_ms``, ``client`` (the peer's address) and, when the path has them, ``study``,
``trial``, ``schedule`` and ``worker``. Never the raw path or its query string, a header (so no
token) or a body: only the route template and the path parameters above, capped in length.
uvicorn's own access log stays off.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

_log = logging.getLogger("caviar.access")

PATH_FIELDS = {"name": "study", "number": "trial", "ref": "schedule", "worker_id": "worker"}
"""Path parameters logged, under these field names."""
MAX_FIELD_CHARS = 200


def _value(field: str, raw: str) -> str | int:
    if field == "trial" and raw.isascii() and raw.isdigit() and len(raw) < 19:
        return int(raw)
    return raw[:MAX_FIELD_CHARS]


def log_request(scope: Scope, route: str, params: dict[str, str], status: int, seconds: float) -> None:
    """Log one answered request (see the module doc for the fields)."""
    level = logging.WARNING if status >= 500 else logging.INFO
    if not _log.isEnabledFor(level):
        return
    client = scope.get("client")
    fields: dict[str, Any] = {
        "method": scope.get("method", ""),
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "client": client[0] if client else None,
    }
    for param, field in PATH_FIELDS.items():
        if param in params:
            fields[field] = _value(field, params[param])
    _log.log(level, "request", extra=fields)
